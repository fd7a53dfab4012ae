"""Device models: guest memory and virtqueues (hw/virtio), virtio-blk (hw/block) and a guest-side driver."""
