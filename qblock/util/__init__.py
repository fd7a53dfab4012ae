"""The runtime QEMU's block layer runs on (QEMU's util/): coroutines, AioContext, timers, iov, throttle maths."""
