"""The driver conformance kit (qblock.testing.conformance) run against the built-in drivers."""
import pytest

from qblock.testing.conformance import CHECKS, DriverUnderTest, run_check, run_conformance
from qblock.testing.memdrv import memdrv_options


def _null(driver):
    return DriverUnderTest(lambda: {"driver": driver, "size": str(1 << 20), "read-zeroes": "on"}, stores_data=False)


def _file(tmp_path, raw=True, **extra):
    path = tmp_path / "conf.img"

    def opts():
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        o = {"driver": "raw", "file.driver": "file", "file.filename": str(path)} if raw else \
            {"driver": "file", "filename": str(path)}
        o.update(extra)
        return o
    return opts


CASES = {
    "file": lambda tmp: DriverUnderTest(_file(tmp, raw=False)),
    "raw-over-file": lambda tmp: DriverUnderTest(_file(tmp)),
    "raw-offset-window": lambda tmp: DriverUnderTest(_file(tmp, offset="4096", size=str(512 << 10)), size=512 << 10),
    "test-mem-sector-512": lambda tmp: DriverUnderTest(
        lambda: memdrv_options("sector", write_zeroes=True, discard=True, block_status=True, size=1 << 20)),
    "test-mem-aio-4k-small-transfer": lambda tmp: DriverUnderTest(
        lambda: memdrv_options("aio", align=4096, max_transfer=16384, size=1 << 20)),
}

# null drivers hold no data: only the contracts that do not need it.
NULL_CHECKS = ["fua_and_flush", "bad_offsets", "read_only", "block_status"]


@pytest.mark.parametrize("check", CHECKS, ids=[c[0] for c in CHECKS])
@pytest.mark.parametrize("case", sorted(CASES))
def test_driver_conformance(case, check, tmp_path):
    """Every built-in storage driver keeps every contract of the kit."""
    d = CASES[case](tmp_path)
    result = run_check(d, check)
    assert result.passed, f"{case} breaks '{result.contract}': {result.detail}"


@pytest.mark.parametrize("driver", ["null-co", "null-aio"])
def test_null_drivers_conform(driver):
    """null-co and null-aio keep the contracts that do not need stored data."""
    report = run_conformance(_null(driver), only=NULL_CHECKS)
    assert report.ok, report.text()


def test_reopen_check_on_persistent_file(tmp_path):
    """Data survives close and open on a real file (the reopen contract)."""
    path = tmp_path / "p.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    d = DriverUnderTest(lambda: {"driver": "raw", "file.driver": "file", "file.filename": str(path)},
                        persistent=True)
    report = run_conformance(d, only=["reopen"])
    assert report.ok, report.text()


def test_a_broken_driver_is_named_with_its_contract():
    """A driver that loses writes fails the model check with the contract it breaks."""
    d = DriverUnderTest(lambda: {"driver": "null-co", "size": str(1 << 20), "read-zeroes": "on"})
    report = run_conformance(d, only=["rw_model"])
    assert not report.ok
    assert "every read returns the bytes last written" in report.text()
