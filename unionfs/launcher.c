/*
 * strata-unionfs, the command as installed by `make`: hands the mount to the
 * resident mount service (unionfs/service.py) over its socket, as
 * unionfs/launch.py does, and exits with the mount's status.
 *
 * Why C: the whole point of the service is a mount in milliseconds, and a
 * Python interpreter takes 10-20 ms to start on this kind of machine even with
 * -IS (no site), where fuse-overlayfs mounts in 3-4 ms. This program only
 * connects, sends and waits: what the command line means stays unionfs.cli's.
 * Whenever the service cannot take the request (not running, or an argument it
 * leaves to the command itself: -f, -d, --help, --version, or a layer given as
 * one of the caller's own fds), it runs the Python launcher (FALLBACK) with the
 * same arguments, which mounts by itself and starts the service.
 *
 * The message: "M" + the arguments joined by NUL, with four fds (working
 * directory, mount namespace, stdout, stderr); the answer: "+" once a mount
 * process took it, then its exit status in decimal.
 *
 * Built by make with -DSOCKET_PATH (unionfs.launch.socket_path()) and
 * -DFALLBACK (the Python launcher script).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SOCKET_PATH
#error "build with -DSOCKET_PATH=..."
#endif
#ifndef FALLBACK
#error "build with -DFALLBACK=..."
#endif

static const char *const local_args[] = {
    "-f", "-d", "--foreground", "--debug", "-h", "--help", "-V", "--version", NULL};
/* Paths that name this process's own descriptors (clone volumes pass their
 * checked layers so): only a process that inherits them can mount them. */
static const char *const own_fds[] = {"/proc/self/fd/", "/dev/fd/", NULL};

static void fallback(char **argv)
{
    argv[0] = (char *)FALLBACK;
    execv(FALLBACK, argv);
    perror("strata-unionfs: " FALLBACK);
    exit(1);
}

static int send_request(int s, int argc, char **argv)
{
    size_t len = 1;
    for (int i = 1; i < argc; i++)
        len += strlen(argv[i]) + 1;
    char *msg = malloc(len);
    if (!msg)
        return -1;
    char *p = msg;
    *p++ = 'M';
    for (int i = 1; i < argc; i++) {
        size_t n = strlen(argv[i]);
        memcpy(p, argv[i], n);
        p += n;
        if (i + 1 < argc)
            *p++ = '\0';
    }
    int fds[4] = {open(".", O_PATH | O_DIRECTORY | O_CLOEXEC),
                  open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC), 1, 2};
    if (fds[0] < 0 || fds[1] < 0) {
        free(msg);
        return -1;
    }
    char control[CMSG_SPACE(sizeof(fds))];
    memset(control, 0, sizeof(control));
    struct iovec iov = {.iov_base = msg, .iov_len = (size_t)(p - msg)};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                        .msg_controllen = sizeof(control)};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(cm), fds, sizeof(fds));
    ssize_t sent = sendmsg(s, &mh, MSG_NOSIGNAL);
    close(fds[0]);
    close(fds[1]);
    free(msg);
    return sent == (ssize_t)iov.iov_len ? 0 : -1;
}

int main(int argc, char **argv)
{
    const char *direct = getenv("STRATA_UNIONFS_DIRECT");
    if (direct && strcmp(direct, "1") == 0)
        fallback(argv);
    for (int i = 1; i < argc; i++) {
        for (const char *const *a = local_args; *a; a++)
            if (strcmp(argv[i], *a) == 0)
                fallback(argv);
        for (const char *const *p = own_fds; *p; p++)
            if (strstr(argv[i], *p))
                fallback(argv);
    }

    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, SOCKET_PATH, sizeof(addr.sun_path) - 1);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr)) != 0 ||
        send_request(s, argc, argv) != 0)
        fallback(argv);

    char answer[16];
    ssize_t n = recv(s, answer, sizeof(answer), 0);
    if (n != 1 || answer[0] != '+')
        fallback(argv); /* refused before a mount process took it: nothing was done */
    n = recv(s, answer, sizeof(answer) - 1, 0);
    if (n <= 0) {
        fputs("strata-unionfs: the mount service ended without an answer\n", stderr);
        return 1;
    }
    answer[n] = '\0';
    return atoi(answer);
}
