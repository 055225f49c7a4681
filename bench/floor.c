/* The floor: libjpeg-turbo alone encoding raw BGRX frames, as fast as this machine does it.
 *
 * Usage: floor FILE WIDTH HEIGHT COUNT QUALITY
 * FILE holds COUNT frames of WIDTH*HEIGHT*4 bytes (BGRX, no row padding), as the bench captured them.
 * Each frame is compressed with tjCompress2 (TJPF_BGRX, 4:2:0, QUALITY, into a preallocated buffer);
 * only that call is timed. Prints one line: "frames N wall_ms W cpu_ms C kb K", per frame.
 * Build: gcc -O2 -o floor floor.c -lturbojpeg (Debian: libturbojpeg0-dev).
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <turbojpeg.h>

static double now(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s FILE WIDTH HEIGHT COUNT QUALITY\n", argv[0]);
        return 2;
    }
    int width = atoi(argv[2]), height = atoi(argv[3]), count = atoi(argv[4]), quality = atoi(argv[5]);
    if (width <= 0 || height <= 0 || count <= 0 || quality < 1 || quality > 100) {
        fprintf(stderr, "floor: bad arguments\n");
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    if (!in) {
        perror(argv[1]);
        return 1;
    }
    size_t frame_size = (size_t)width * height * 4;
    unsigned char *frame = malloc(frame_size);
    unsigned long cap = tjBufSize(width, height, TJSAMP_420);
    unsigned char *jpeg = tjAlloc((int)cap);
    tjhandle tj = tjInitCompress();
    if (!frame || !jpeg || !tj) {
        fprintf(stderr, "floor: out of memory or no TurboJPEG instance\n");
        return 1;
    }
    double wall = 0, cpu = 0, bytes = 0;
    int done = 0;
    for (; done < count; done++) {
        if (fread(frame, 1, frame_size, in) != frame_size) {
            fprintf(stderr, "floor: %s holds only %d frames\n", argv[1], done);
            return 1;
        }
        unsigned long size = cap;
        double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
        if (tjCompress2(tj, frame, width, width * 4, height, TJPF_BGRX, &jpeg, &size, TJSAMP_420,
                        quality, TJFLAG_NOREALLOC) != 0) {
            fprintf(stderr, "floor: tjCompress2: %s\n", tjGetErrorStr2(tj));
            return 1;
        }
        cpu += now(CLOCK_PROCESS_CPUTIME_ID) - c0;
        wall += now(CLOCK_MONOTONIC) - w0;
        bytes += size;
    }
    printf("frames %d wall_ms %.3f cpu_ms %.3f kb %.1f\n", done, 1000 * wall / done, 1000 * cpu / done,
           bytes / done / 1024);
    tjDestroy(tj);
    tjFree(jpeg);
    free(frame);
    fclose(in);
    return 0;
}
