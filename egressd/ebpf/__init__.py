"""eBPF plumbing shared by the node agent and the proxy: the bpf(2) syscalls (`syscall`) and
building objects with clang and pinning them in a private bpffs (`build`)."""
