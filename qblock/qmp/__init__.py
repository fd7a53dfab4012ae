"""QMP, the QEMU Machine Protocol: the monitor half of qemu-storage-daemon.

One module per QEMU file (or small group of files):

* ``qjson``          qobject/json-lexer.c, json-streamer.c, json-parser.c, qjson.c, qdict.c's key order
* ``qapi_schema``    qapi/*.json: the types the commands here take and return, declared as QAPI does
* ``qapi_visit``     qapi/qobject-input-visitor.c: checking arguments against the schema
* ``dispatch``       qapi/qmp-dispatch.c, qapi/qmp-registry.c: the command table and qmp_dispatch
* ``char_socket``    chardev/char-socket.c (and chardev/char.c's registry): the monitor's UNIX/TCP socket
* ``monitor``        monitor/qmp.c, monitor/monitor.c: a QMP monitor on a chardev, events
* ``qmp_cmds``       monitor/qmp-cmds.c, monitor/qmp-cmds-control.c: qmp_capabilities, query-version, quit ...
* ``blockdev``       blockdev.c, block/write-threshold.c: blockdev-add/-del, throttling, histograms
* ``block_qapi``     block/qapi.c: query-block, query-named-block-nodes, query-blockstats
* ``qom_cmds``       qom/qom-qmp-cmds.c, qom/object_interfaces.c: object-add/-del (throttle-group, iothread)
* ``block_export_cmds``  blockdev-nbd.c, block/export/export.c: the QMP side of NBD and block exports
* ``qmp_marshal``    the generated qapi-init-commands.c: which command takes which argument type

The storage daemon (storage-daemon/qemu-storage-daemon.c) is ``qblock.tools.storage_daemon``.
"""
