"""The seccomp allowlist, compiled to classic BPF on the host with libseccomp.

In the spirit of Docker's default profile (an allowlist, EPERM for the rest), plus denials Docker
lacks: io_uring, userfaultfd, keyctl, bpf, perf_event_open, ptrace, process_vm_*, the mount API,
namespace creation (unshare/setns, clone with namespace flags; clone3 answers ENOSYS so libc falls
back to clone, whose flags we can inspect), inotify (ENOSYS: watches on the shared read-only root would
see other sandboxes' file opens), setuid/setgid mode bits (a writable host directory's files are its
owner's on the host), and sockets other than unix/inet/inet6/netlink. Only the native ABI is
allowed: i386 and x32 system calls kill the process.

The agent installs the compiled bytes itself (stdlib only), so libseccomp never enters the sandbox.
"""

from __future__ import annotations

import errno
import functools
import tempfile

ALLOWED = """
accept accept4 access alarm arch_prctl bind brk cachestat capget capset chdir chown clock_getres
clock_gettime clock_nanosleep close close_range connect copy_file_range dup dup2 dup3 epoll_create
epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat exit
exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchown fchownat fcntl fdatasync
fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex
futex_requeue futex_wait futex_waitv futex_wake futimesat get_mempolicy get_robust_list getcpu
getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresuid getrlimit getrusage getsid getsockname
getsockopt gettid gettimeofday getuid getxattr inotify_add_watch inotify_rm_watch ioctl ioprio_get
ioprio_set kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr
link linkat listen listxattr llistxattr lremovexattr lseek lsetxattr lstat map_shadow_stack
mbind membarrier memfd_create mincore mkdir mkdirat mlock mlock2 mlockall mmap mprotect
mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap msgctl msgget msgrcv
msgsnd msync munlock munlockall munmap nanosleep newfstatat pause pidfd_getfd pidfd_open
pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll pread64 preadv
preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv
recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat renameat2 restart_syscall
rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min sched_getaffinity
sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval sched_setaffinity
sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy set_robust_list set_tid_address setfsgid
setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid setreuid
setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 socketpair splice stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo
tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime timer_settime
timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat
utime utimensat utimes vfork vmsplice wait4 waitid write writev
""".split()

# Explicitly refused (they fall to the default EPERM anyway; listed so a reader sees the intent and a
# test can check that none of them slipped into ALLOWED).
DENIED = """
io_uring_setup io_uring_enter io_uring_register userfaultfd keyctl add_key request_key bpf
perf_event_open ptrace process_vm_readv process_vm_writev process_madvise kcmp mount umount2
pivot_root chroot unshare setns open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr
init_module finit_module delete_module kexec_load kexec_file_load reboot swapon swapoff acct
quotactl quotactl_fd open_by_handle_at name_to_handle_at fanotify_init lookup_dcookie
iopl ioperm modify_ldt vhangup syslog clock_settime clock_adjtime adjtimex settimeofday
sethostname setdomainname
""".split()

# Answered ENOSYS ("this kernel has none"), so programs take their fallback instead of failing.
# clone3: libc falls back to clone, whose flags the filter can inspect. inotify: every process-tier sandbox
# reads the same host inodes for its read-only root, so a watch on them would report other sandboxes' (and
# the host's) opens and reads, e.g. which modules they import; `tail -f`, watchdog and the like poll instead.
# (fanotify_init is refused above; its inode marks would see the same events.)
# openat2: its mode is inside a struct the filter cannot read (see SETID_MODE_ARG); libc never needs it.
UNIMPLEMENTED = ("clone3", "inotify_init", "inotify_init1", "openat2")

# Memory merging (KSM) is the operator's choice for the whole host (_host/ksm.py): a sandbox may not mark its own
# memory mergeable. Otherwise, on a host whose ksmd runs for other programs (VMs), it could merge its pages with
# theirs and time copy-on-write faults to learn what they hold. Allowed only where the operator asked for KSM
# (the sandbox is then mergeable already). Unmarking (MADV_UNMERGEABLE, PR_SET_MEMORY_MERGE 0) stays allowed.
PR_SET_MEMORY_MERGE = 67
MADV_MERGEABLE = 12

SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
CLONE_NAMESPACE_FLAGS = 0x7E020080  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # the harmless ones Docker allows
# mknod makes FIFOs, sockets and plain files; device nodes (S_IFCHR, S_IFBLK) are refused here, not only
# for want of CAP_MKNOD: gVisor's own kernel lets any uid create them in its tmpfs.
S_IFMT = 0o170000
MKNOD_TYPES = (0, 0o100000, 0o010000, 0o140000)  # default (regular), S_IFREG, S_IFIFO, S_IFSOCK
# No setuid or setgid bit on a file the code makes or changes: pointless inside (every mount is nosuid,
# no_new_privs is set), but a writable host directory's files belong to its owner on the host, where a
# setuid file would run as that owner for anyone. Allowed only with both bits clear in the mode argument.
S_ISETID = 0o6000
SETID_MODE_ARG = {"chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2, "creat": 1, "open": 2, "openat": 3}


@functools.lru_cache(maxsize=4)
def compiled_filter(allow_merging: bool = False) -> bytes:
    """The BPF program, built once per host process (and per choice about memory merging)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in ALLOWED:
        try:
            f.add_rule(sc.ALLOW, name)
        except (ValueError, OSError):
            pass  # a syscall this architecture does not have
    if allow_merging:
        f.add_rule(sc.ALLOW, "prctl")
        f.add_rule(sc.ALLOW, "madvise")
    else:
        f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.NE, PR_SET_MEMORY_MERGE))
        f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, PR_SET_MEMORY_MERGE), sc.Arg(1, sc.EQ, 0))
        f.add_rule(sc.ALLOW, "madvise", sc.Arg(2, sc.NE, MADV_MERGEABLE))
    for value in SOCKET_FAMILIES.values():
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, value))
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
    for name in UNIMPLEMENTED:
        try:
            f.add_rule(sc.ERRNO(errno.ENOSYS), name)
        except (ValueError, OSError):
            pass  # aarch64 has no inotify_init, only inotify_init1
    for value in PERSONALITIES:
        f.add_rule(sc.ALLOW, "personality", sc.Arg(0, sc.EQ, value))
    for name, arg in SETID_MODE_ARG.items():
        try:
            f.add_rule(sc.ALLOW, name, sc.Arg(arg, sc.MASKED_EQ, S_ISETID, 0))
        except (ValueError, OSError):
            pass  # not on this architecture (aarch64 has no open, creat or chmod)
    for kind in MKNOD_TYPES:
        f.add_rule(sc.ALLOW, "mknodat", sc.Arg(2, sc.MASKED_EQ, S_IFMT | S_ISETID, kind))
        try:
            f.add_rule(sc.ALLOW, "mknod", sc.Arg(1, sc.MASKED_EQ, S_IFMT | S_ISETID, kind))
        except (ValueError, OSError):
            pass  # aarch64 has only mknodat
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.flush()
        out.seek(0)
        data = out.read()
    if not data:
        raise RuntimeError("libseccomp produced an empty filter")
    return data


def libseccomp_version() -> str | None:
    try:
        import pyseccomp as sc

        return "%d.%d.%d" % tuple(sc.get_library_version()) if hasattr(sc, "get_library_version") else "present"
    except (ImportError, OSError):
        return None


__all__ = ["compiled_filter", "ALLOWED", "DENIED", "UNIMPLEMENTED"]
