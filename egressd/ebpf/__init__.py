"""eBPF plumbing shared by the node agent and the proxy: the bpf(2) syscalls (`syscall`),
building objects with clang and mounting a private bpffs (`build`), and loading, pinning,
opening and attaching tc programs (`tc`)."""
