"""The one table of trace events, in QEMU's trace-events syntax.

Each ``# file`` line names the QEMU source file whose ``trace-events`` list the
declarations below it come from (util/trace-events, block/trace-events,
hw/block/trace-events ...), so a reader can grep QEMU for the same name.
Events QEMU does not have are grouped under ``# qblock:`` lines and say so.

Importing this module defines one function per event, ``trace_<name>``; call
sites import them by name.  Third-party drivers declare their own with
:func:`qblock.trace.control.trace_events_declare`.
"""
from qblock.trace.control import trace_events_declare

TRACE_EVENTS = r'''
# util/qemu-coroutine.c
qemu_aio_coroutine_enter(void *ctx, void *from, void *to, void *opaque) "ctx %p from %p to %p opaque %p"
qemu_coroutine_yield(void *from, void *to) "from %p to %p"
qemu_coroutine_terminate(void *co) "self %p"

# util/qemu-coroutine-lock.c
qemu_co_mutex_lock_uncontended(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_lock_entry(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_lock_return(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_unlock_entry(void *mutex, void *self) "mutex %p self %p"
qemu_co_mutex_unlock_return(void *mutex, void *self) "mutex %p self %p"

# util/async.c
aio_co_schedule(void *ctx, void *co) "ctx %p co %p"
aio_co_schedule_bh_cb(void *ctx, void *co) "ctx %p co %p"

# util/thread-pool.c
thread_pool_submit(void *pool, void *req, void *opaque) "pool %p req %p opaque %p"
thread_pool_complete(void *pool, void *req, void *opaque, int ret) "pool %p req %p opaque %p ret %d"
thread_pool_cancel(void *req, void *opaque) "req %p opaque %p"

# qblock: runtime events QEMU has no trace point for
qemu_coroutine_create(void *co, void *entry, void *opaque) "co %p entry %p opaque %p"
aio_bh_schedule(void *ctx, void *bh, void *cb) "ctx %p bh %p cb %p"
aio_bh_call(void *ctx, void *bh, void *cb) "ctx %p bh %p cb %p"
timer_mod(void *ctx, void *timer, int clock, int64_t expire_ns) "ctx %p timer %p clock %d expire_ns %" PRId64
timer_fire(void *ctx, void *timer, int clock, int64_t expire_ns) "ctx %p timer %p clock %d expire_ns %" PRId64
aio_poll(void *ctx, int blocking, int progress) "ctx %p blocking %d progress %d"

# block.c
bdrv_open_common(void *bs, const char *filename, int flags, const char *format_name) "bs %p filename \"%s\" flags 0x%x format_name \"%s\""

# qblock: block.c events QEMU has no trace point for
bdrv_unref_close(void *bs) "bs %p"

# block/block-backend.c
blk_co_preadv(void *blk, void *bs, int64_t offset, unsigned int bytes, int flags) "blk %p bs %p offset %"PRId64" bytes %u flags 0x%x"
blk_co_pwritev(void *blk, void *bs, int64_t offset, unsigned int bytes, int flags) "blk %p bs %p offset %"PRId64" bytes %u flags 0x%x"
blk_root_attach(void *child, void *blk, void *bs) "child %p blk %p bs %p"
blk_root_detach(void *child, void *blk, void *bs) "child %p blk %p bs %p"

# qblock: block/block-backend.c stages QEMU does not trace
blk_aio_prwv(void *blk, const char *op, int64_t offset, int64_t bytes, void *co) "blk %p op %s offset %"PRId64" bytes %"PRId64" co %p"
blk_aio_complete(void *blk, void *acb, int ret, int deferred) "blk %p acb %p ret %d deferred_to_bh %d"
blk_check_byte_request(void *blk, int64_t offset, int64_t bytes, int ret) "blk %p offset %"PRId64" bytes %"PRId64" ret %d"
blk_add_fua(void *blk) "blk %p write cache off: adding BDRV_REQ_FUA"
blk_wait_while_drained(void *blk) "blk %p queued while drained"

# block/io.c
bdrv_co_preadv(void *bs, int64_t offset, int64_t nbytes, unsigned int flags) "bs %p offset %"PRId64" nbytes %"PRId64" flags 0x%x"
bdrv_co_pwritev(void *bs, int64_t offset, int64_t nbytes, unsigned int flags) "bs %p offset %"PRId64" nbytes %"PRId64" flags 0x%x"
bdrv_co_pwrite_zeroes(void *bs, int64_t offset, int64_t bytes, int flags) "bs %p offset %"PRId64" bytes %"PRId64" flags 0x%x"
bdrv_co_do_copy_on_readv(void *bs, int64_t offset, int64_t bytes, int64_t cluster_offset, int64_t cluster_bytes) "bs %p offset %"PRId64" bytes %"PRId64" cluster_offset %"PRId64" cluster_bytes %"PRId64

# qblock: block/io.c stages QEMU does not trace
bdrv_pad_head(void *bs, int64_t offset, int64_t head, int64_t align) "bs %p offset %"PRId64" head %"PRId64" bytes of padding (request_alignment %"PRId64")"
bdrv_pad_tail(void *bs, int64_t offset, int64_t tail, int64_t align) "bs %p offset %"PRId64" tail %"PRId64" bytes of padding (request_alignment %"PRId64")"
bdrv_padding_rmw_read(void *bs, const char *part, int64_t offset, int64_t bytes) "bs %p RMW read of the %s: offset %"PRId64" bytes %"PRId64
bdrv_mark_request_serialising(void *bs, void *req, int64_t overlap_offset, int64_t overlap_bytes) "bs %p req %p serialising over offset %"PRId64" bytes %"PRId64
bdrv_wait_serialising_requests(void *bs, void *req, void *waiting_for) "bs %p req %p waits for %p"
bdrv_aligned_preadv(void *bs, int64_t offset, int64_t bytes, int flags) "bs %p offset %"PRId64" bytes %"PRId64" flags 0x%x"
bdrv_aligned_pwritev(void *bs, int64_t offset, int64_t bytes, int flags) "bs %p offset %"PRId64" bytes %"PRId64" flags 0x%x"
bdrv_before_write_notifiers(void *bs, int64_t offset, int64_t bytes, int ret) "bs %p offset %"PRId64" bytes %"PRId64" ret %d"
bdrv_detect_zeroes(void *bs, int64_t offset, int64_t bytes, int flags) "bs %p offset %"PRId64" bytes %"PRId64" all zero: flags now 0x%x"
bdrv_fragment(void *bs, int64_t offset, int64_t bytes, int64_t max_transfer) "bs %p offset %"PRId64" bytes %"PRId64" split at max_transfer %"PRId64
bdrv_driver_preadv(void *bs, const char *style, int64_t offset, int64_t bytes, int flags) "bs %p %s offset %"PRId64" bytes %"PRId64" flags 0x%x"
bdrv_driver_pwritev(void *bs, const char *style, int64_t offset, int64_t bytes, int flags) "bs %p %s offset %"PRId64" bytes %"PRId64" flags 0x%x"
bdrv_driver_done(void *bs, const char *hook, int ret) "bs %p %s returned %d"
bdrv_fua_emulate(void *bs, int64_t offset, int64_t bytes) "bs %p driver lacks BDRV_REQ_FUA: bdrv_co_flush after the write at offset %"PRId64" bytes %"PRId64
bdrv_driver_exception(void *bs, const char *hook, const char *exc) "bs %p %s raised %s: returning -EIO"
bdrv_co_flush(void *bs, int gen, int flushed_gen) "bs %p write_gen %d flushed_gen %d"
bdrv_co_pdiscard(void *bs, int64_t offset, int64_t bytes) "bs %p offset %"PRId64" bytes %"PRId64
bdrv_write_threshold_exceeded(void *bs, int64_t amount, int64_t threshold) "bs %p exceeded by %"PRId64" bytes (threshold %"PRId64")"

# qblock: block/throttle-groups.c and block/throttle.c events (QEMU traces no throttling step)
throttle_group_register_tgm(void *tgm, const char *group, void *ctx) "tgm %p group \"%s\" ctx %p"
throttle_group_unregister_tgm(void *tgm, const char *group) "tgm %p group \"%s\""
throttle_group_config(void *tgm, const char *group) "tgm %p group \"%s\": new limits, buckets emptied"
throttle_group_co_io_limits_intercept(void *tgm, int64_t bytes, int is_write, void *token, int must_wait, unsigned int pending) "tgm %p bytes %"PRId64" is_write %d token %p must_wait %d queued before %u"
throttle_group_io_limits_resume(void *tgm, int64_t bytes, int is_write) "tgm %p bytes %"PRId64" is_write %d: queued request goes"
throttle_group_schedule_timer(void *tgm, int is_write, int64_t expire_ns) "tgm %p is_write %d timer armed for %"PRId64" ns"
throttle_group_schedule_next_request(void *tgm, void *token, int is_write, const char *how) "tgm %p next token %p is_write %d: %s"
throttle_group_timer_cb(void *tgm, int is_write) "tgm %p is_write %d"
throttle_group_restart_queue(void *tgm, int is_write, int woken) "tgm %p is_write %d woke a request %d"

# hw/virtio/virtio.c
virtqueue_fill(void *vq, const void *elem, unsigned int len, unsigned int idx) "vq %p elem %p len %u idx %u"
virtqueue_flush(void *vq, unsigned int count) "vq %p count %u"
virtqueue_pop(void *vq, void *elem, unsigned int in_num, unsigned int out_num) "vq %p elem %p in_num %u out_num %u"
virtio_queue_notify(void *vdev, int n, void *vq) "vdev %p n %d vq %p"
virtio_notify_irqfd(void *vdev, void *vq) "vdev %p vq %p"
virtio_notify(void *vdev, void *vq) "vdev %p vq %p"
virtio_set_status(void *vdev, uint8_t val) "vdev %p val %u"

# qblock: hw/virtio/virtio.c events QEMU has no trace point for
virtio_error(void *vdev, const char *msg) "vdev %p device broken: %s"

# hw/block/virtio-blk.c
virtio_blk_req_complete(void *vdev, void *req, int status) "vdev %p req %p status %d"
virtio_blk_rw_complete(void *vdev, void *req, int ret) "vdev %p req %p ret %d"
virtio_blk_handle_write(void *vdev, void *req, uint64_t sector, size_t nsectors) "vdev %p req %p sector %"PRIu64" nsectors %zu"
virtio_blk_handle_read(void *vdev, void *req, uint64_t sector, size_t nsectors) "vdev %p req %p sector %"PRIu64" nsectors %zu"
virtio_blk_submit_multireq(void *vdev, void *mrb, int start, int num_reqs, uint64_t offset, size_t size, bool is_write) "vdev %p mrb %p start %d num_reqs %d offset %"PRIu64" size %zu is_write %d"

# hw/block/dataplane/virtio-blk.c
virtio_blk_data_plane_start(void *s) "dataplane %p"
virtio_blk_data_plane_stop(void *s) "dataplane %p"

# block/qcow2.c
qcow2_writev_start_req(void *co, int64_t offset, int64_t bytes) "co %p offset 0x%" PRIx64 " bytes %" PRId64
qcow2_writev_done_req(void *co, int ret) "co %p ret %d"
qcow2_writev_start_part(void *co) "co %p"
qcow2_writev_done_part(void *co, int cur_bytes) "co %p cur_bytes %d"
qcow2_writev_data(void *co, uint64_t offset) "co %p offset 0x%" PRIx64
qcow2_pwrite_zeroes_start_req(void *co, int64_t offset, int64_t bytes) "co %p offset 0x%" PRIx64 " bytes %" PRId64
qcow2_pwrite_zeroes(void *co, int64_t offset, int64_t bytes) "co %p offset 0x%" PRIx64 " bytes %" PRId64

# block/qcow2-cluster.c
qcow2_alloc_clusters_offset(void *co, uint64_t offset, int bytes) "co %p offset 0x%" PRIx64 " bytes %d"
qcow2_handle_copied(void *co, uint64_t guest_offset, uint64_t host_offset, uint64_t bytes) "co %p guest_offset 0x%" PRIx64 " host_offset 0x%" PRIx64 " bytes 0x%" PRIx64
qcow2_handle_alloc(void *co, uint64_t guest_offset, uint64_t host_offset, uint64_t bytes) "co %p guest_offset 0x%" PRIx64 " host_offset 0x%" PRIx64 " bytes 0x%" PRIx64
qcow2_do_alloc_clusters_offset(void *co, uint64_t guest_offset, uint64_t host_offset, int nb_clusters) "co %p guest_offset 0x%" PRIx64 " host_offset 0x%" PRIx64 " nb_clusters %d"
qcow2_cluster_alloc_phys(void *co) "co %p"
qcow2_cluster_link_l2(void *co, int nb_clusters) "co %p nb_clusters %d"
qcow2_l2_allocate(void *bs, int l1_index) "bs %p l1_index %d"
qcow2_l2_allocate_get_empty(void *bs, int l1_index) "bs %p l1_index %d"
qcow2_l2_allocate_write_l2(void *bs, int l1_index) "bs %p l1_index %d"
qcow2_l2_allocate_write_l1(void *bs, int l1_index) "bs %p l1_index %d"
qcow2_l2_allocate_done(void *bs, int l1_index, int ret) "bs %p l1_index %d ret %d"

# block/qcow2-cache.c
qcow2_cache_get(void *co, int c, uint64_t offset, bool read_from_disk) "co %p is_l2_cache %d offset 0x%" PRIx64 " read_from_disk %d"
qcow2_cache_get_replace_entry(void *co, int c, int i) "co %p is_l2_cache %d index %d"
qcow2_cache_get_read(void *co, int c, int i) "co %p is_l2_cache %d index %d"
qcow2_cache_get_done(void *co, int c, int i) "co %p is_l2_cache %d index %d"
qcow2_cache_flush(void *co, int c) "co %p is_l2_cache %d"
qcow2_cache_entry_flush(void *co, int c, int i) "co %p is_l2_cache %d index %d"

# qblock: qcow2 steps QEMU has no trace point for
qcow2_handle_dependencies_wait(void *co, void *old_alloc) "co %p waits for the in-flight allocation %p"
qcow2_perform_cow(void *co, uint64_t guest_offset, uint64_t host_offset, int start_bytes, int end_bytes) "co %p guest_offset 0x%" PRIx64 " host_offset 0x%" PRIx64 " cow_start %d bytes cow_end %d bytes"
qcow2_signal_corruption(void *bs, int fatal, const char *msg) "bs %p fatal %d: %s"
'''

globals().update(trace_events_declare(TRACE_EVENTS))
