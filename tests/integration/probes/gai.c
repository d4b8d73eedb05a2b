/* getaddrinfo(name) as a UDF sees it, built against glibc (cc) and musl (musl-gcc).
 * Prints one line: "ok <address> <ms>" or "err <EAI_* name> <ms> <gai_strerror>". */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <time.h>

static const char *eai_name(int rc) {
    switch (rc) {
    case EAI_AGAIN: return "EAI_AGAIN";
    case EAI_NONAME: return "EAI_NONAME";
    case EAI_FAIL: return "EAI_FAIL";
#ifdef EAI_NODATA
    case EAI_NODATA: return "EAI_NODATA";
#endif
    case EAI_SYSTEM: return "EAI_SYSTEM";
    default: return "EAI_OTHER";
    }
}

int main(int argc, char **argv) {
    struct addrinfo hints, *res = NULL;
    struct timespec t0, t1;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = getaddrinfo(argv[1], NULL, &hints, &res);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    if (rc == 0) {
        char buf[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &((struct sockaddr_in *)res->ai_addr)->sin_addr, buf, sizeof buf);
        printf("ok %s %.1f\n", buf, ms);
        freeaddrinfo(res);
        return 0;
    }
    printf("err %s %.1f %s\n", eai_name(rc), ms, gai_strerror(rc));
    return 1;
}
