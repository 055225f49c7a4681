/* spice_grab: a headless SPICE client that saves the first real streamed picture.
 *
 * spicy-screenshot saves on the first display-invalidate, which for a stream
 * device is the server's black fill of the new surface, not a frame. This
 * client keeps the session until the primary surface holds non-black pixels
 * for --frames invalidations, then writes the primary as a PPM. It also
 * reports the cursor the server forwards (cursor-set), so a test can check
 * the guest's CURSOR_SET made it to a client.
 *
 * stdout (one line per event, flushed):
 *   PRIMARY <w> <h> <format>
 *   FRAME <n> <x> <y> <w> <h>        an invalidation after the picture turned non-black
 *   CURSOR_SET <w> <h> <hot_x> <hot_y> [file=<path>]
 *   CURSOR_MOVE <x> <y>
 *   SAVED <path> <w> <h>
 *   CHANNEL <type> <id>              a display or cursor channel the server offers
 *   ERROR <text>
 * exit: 0 saved (and cursor seen if asked), 1 connection failed, 2 timed out.
 *
 * Usage: spice_grab -h HOST -p PORT -o OUT.ppm [-t SECONDS] [-n FRAMES]
 *                   [--cursor-out RAW] [--wait-cursor] [--channel-id N] [--serve]
 *
 * --channel-id N picks the display (and cursor) channel to watch, default 0. A QEMU VM with a
 * QXL card and a stream device offers two: QXL's is 0, the stream device's a later id.
 *
 * --serve keeps the client connected after the first picture is saved (a viewer, so the server
 * keeps streaming) and reads commands on stdin, one per line:
 *   save <path>     write the current picture:  SAVED <path> <w> <h> <invalidations so far>
 *   quit            disconnect and exit 0 (so does end of input)
 * -t then bounds the whole session. FRAME lines stop after the first save; each invalidation
 * after it is reported as INVALIDATE <n> <x> <y> <w> <h> (n counts all of them).
 */
#include <spice-client.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static gchar *host = "127.0.0.1";
static gint port;
static gchar *out_path;
static gchar *cursor_path;
static gint timeout_s = 20;
static gint want_frames = 1;
static gboolean wait_cursor;
static gint channel_id = 0;
static gboolean serve;
static guint invalidations;

static GMainLoop *loop;
static int exit_code = 2;
static SpiceChannel *display;
static int frames;
static gboolean saved;
static gboolean cursor_seen;

static void emit(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

static void emit(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

static void maybe_finish(void)
{
    if (saved && (!wait_cursor || cursor_seen)) {
        exit_code = 0;
        if (!serve) g_main_loop_quit(loop);
    }
}

static gboolean primary_has_content(const SpiceDisplayPrimary *p)
{
    for (int y = 0; y < p->height; y++) {
        const guint32 *row = (const guint32 *)(p->data + (gsize)y * p->stride);
        for (int x = 0; x < p->width; x++) {
            if (row[x] & 0x00ffffff) return TRUE;
        }
    }
    return FALSE;
}

static gboolean save_ppm(const SpiceDisplayPrimary *p)
{
    FILE *f = fopen(out_path, "wb");
    if (!f) {
        emit("ERROR cannot write %s", out_path);
        return FALSE;
    }
    fprintf(f, "P6\n%d %d\n255\n", p->width, p->height);
    guint8 *rgb = g_malloc((gsize)p->width * 3);
    for (int y = 0; y < p->height; y++) {
        const guint8 *src = p->data + (gsize)y * p->stride;
        for (int x = 0; x < p->width; x++) {
            /* xRGB little-endian: bytes are B, G, R, x. */
            rgb[x * 3 + 0] = src[x * 4 + 2];
            rgb[x * 3 + 1] = src[x * 4 + 1];
            rgb[x * 3 + 2] = src[x * 4 + 0];
        }
        fwrite(rgb, 3, p->width, f);
    }
    g_free(rgb);
    return fclose(f) == 0;
}

static void on_primary_create(SpiceChannel *channel, gint format, gint width, gint height,
                              gint stride, gint shmid, gpointer imgdata, gpointer data)
{
    (void)channel;
    (void)stride;
    (void)shmid;
    (void)imgdata;
    (void)data;
    emit("PRIMARY %d %d %d", width, height, format);
}

static void on_invalidate(SpiceChannel *channel, gint x, gint y, gint w, gint h, gpointer data)
{
    (void)data;
    invalidations++;
    if (saved) {
        /* A viewer's timeline (the VM suite keeps it with times): when pictures came. */
        if (serve) emit("INVALIDATE %u %d %d %d %d", invalidations, x, y, w, h);
        return;
    }
    SpiceDisplayPrimary p;
    if (!spice_display_channel_get_primary(channel, 0, &p) || p.format != SPICE_SURFACE_FMT_32_xRGB) {
        return;
    }
    /* The first invalidation is the server's black fill of the new surface. */
    if (!frames && !primary_has_content(&p)) return;
    frames++;
    emit("FRAME %d %d %d %d %d", frames, x, y, w, h);
    if (frames >= want_frames) {
        if (!save_ppm(&p)) {
            exit_code = 1;
            g_main_loop_quit(loop);
            return;
        }
        saved = TRUE;
        emit("SAVED %s %d %d", out_path, p.width, p.height);
        maybe_finish();
    }
}

static void on_cursor_set(SpiceChannel *channel, gint width, gint height, gint hot_x, gint hot_y,
                          gpointer rgba, gpointer data)
{
    (void)channel;
    (void)data;
    if (cursor_path && rgba && width > 0 && height > 0) {
        FILE *f = fopen(cursor_path, "wb");
        if (f) {
            fwrite(rgba, 4, (gsize)width * height, f);
            fclose(f);
        }
        emit("CURSOR_SET %d %d %d %d file=%s", width, height, hot_x, hot_y, cursor_path);
    } else {
        emit("CURSOR_SET %d %d %d %d", width, height, hot_x, hot_y);
    }
    cursor_seen = TRUE;
    maybe_finish();
}

static void on_cursor_move(SpiceChannel *channel, gint x, gint y, gpointer data)
{
    (void)channel;
    (void)data;
    emit("CURSOR_MOVE %d %d", x, y);
}

static void on_main_event(SpiceChannel *channel, SpiceChannelEvent event, gpointer data)
{
    (void)channel;
    (void)data;
    if (event != SPICE_CHANNEL_OPENED) {
        emit("ERROR main channel event %d", event);
        exit_code = 1;
        g_main_loop_quit(loop);
    }
}

static void on_channel_new(SpiceSession *session, SpiceChannel *channel, gpointer data)
{
    (void)session;
    (void)data;
    int id;
    g_object_get(channel, "channel-id", &id, NULL);
    if (SPICE_IS_DISPLAY_CHANNEL(channel)) {
        emit("CHANNEL display %d", id);
    } else if (SPICE_IS_CURSOR_CHANNEL(channel)) {
        emit("CHANNEL cursor %d", id);
    }
    if (SPICE_IS_MAIN_CHANNEL(channel)) {
        g_signal_connect(channel, "channel-event", G_CALLBACK(on_main_event), NULL);
    } else if (SPICE_IS_DISPLAY_CHANNEL(channel) && id == channel_id) {
        display = channel;
        g_signal_connect(channel, "display-primary-create", G_CALLBACK(on_primary_create), NULL);
        g_signal_connect(channel, "display-invalidate", G_CALLBACK(on_invalidate), NULL);
        spice_channel_connect(channel);
    } else if (SPICE_IS_CURSOR_CHANNEL(channel) && id == channel_id) {
        g_signal_connect(channel, "cursor-set", G_CALLBACK(on_cursor_set), NULL);
        g_signal_connect(channel, "cursor-move", G_CALLBACK(on_cursor_move), NULL);
        spice_channel_connect(channel);
    }
}

static gboolean on_stdin(GIOChannel *source, GIOCondition cond, gpointer data)
{
    (void)cond;
    (void)data;
    gchar *line = NULL;
    gsize len = 0;
    GIOStatus st = g_io_channel_read_line(source, &line, &len, NULL, NULL);
    if (st == G_IO_STATUS_AGAIN) return G_SOURCE_CONTINUE;
    if (st != G_IO_STATUS_NORMAL || !line) {
        exit_code = saved ? 0 : exit_code;
        g_main_loop_quit(loop);
        return G_SOURCE_REMOVE;
    }
    g_strstrip(line);
    if (g_str_has_prefix(line, "save ")) {
        SpiceDisplayPrimary p;
        const gchar *path = line + 5;
        if (!display || !spice_display_channel_get_primary(display, 0, &p)
            || p.format != SPICE_SURFACE_FMT_32_xRGB) {
            emit("ERROR no picture to save");
        } else {
            gchar *old = out_path;
            out_path = (gchar *)path;
            if (save_ppm(&p)) emit("SAVED %s %d %d %u", path, p.width, p.height, invalidations);
            out_path = old;
        }
    } else if (g_strcmp0(line, "quit") == 0) {
        exit_code = 0;
        g_main_loop_quit(loop);
    } else if (*line) {
        emit("ERROR unknown command %s", line);
    }
    g_free(line);
    return G_SOURCE_CONTINUE;
}

static gboolean on_timeout(gpointer data)
{
    (void)data;
    emit("ERROR timed out after %d s (frames=%d cursor=%d channel=%d%s)", timeout_s, frames,
         cursor_seen, channel_id, display ? "" : " not offered");
    exit_code = 2;
    g_main_loop_quit(loop);
    return G_SOURCE_REMOVE;
}

static GOptionEntry entries[] = {
    {"host", 'h', 0, G_OPTION_ARG_STRING, &host, "server address", "HOST"},
    {"port", 'p', 0, G_OPTION_ARG_INT, &port, "server port", "PORT"},
    {"out-file", 'o', 0, G_OPTION_ARG_FILENAME, &out_path, "PPM to write", "PATH"},
    {"timeout", 't', 0, G_OPTION_ARG_INT, &timeout_s, "give up after SECONDS", "SECONDS"},
    {"frames", 'n', 0, G_OPTION_ARG_INT, &want_frames, "save at the Nth non-black frame", "N"},
    {"cursor-out", 0, 0, G_OPTION_ARG_FILENAME, &cursor_path, "raw RGBA of the cursor", "PATH"},
    {"wait-cursor", 0, 0, G_OPTION_ARG_NONE, &wait_cursor, "also wait for a cursor", NULL},
    {"channel-id", 0, 0, G_OPTION_ARG_INT, &channel_id, "display/cursor channel id (default 0)",
     "N"},
    {"serve", 0, 0, G_OPTION_ARG_NONE, &serve, "stay connected, take commands on stdin", NULL},
    {NULL, 0, 0, 0, NULL, NULL, NULL},
};

int main(int argc, char **argv)
{
    GError *error = NULL;
    GOptionContext *ctx = g_option_context_new("- save a streamed SPICE display");
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, &argc, &argv, &error) || !port || !out_path) {
        fprintf(stderr, "usage: spice_grab -h HOST -p PORT -o OUT.ppm [-t S] [-n N] [--channel-id N]\n");
        return 64;
    }
    g_option_context_free(ctx);

    loop = g_main_loop_new(NULL, FALSE);
    SpiceSession *session = spice_session_new();
    gchar *port_str = g_strdup_printf("%d", port);
    g_object_set(session, "host", host, "port", port_str, NULL);
    g_signal_connect(session, "channel-new", G_CALLBACK(on_channel_new), NULL);
    if (!spice_session_connect(session)) {
        emit("ERROR spice_session_connect failed");
        return 1;
    }
    g_timeout_add_seconds(timeout_s, on_timeout, NULL);
    if (serve) {
        GIOChannel *in = g_io_channel_unix_new(0);
        g_io_add_watch(in, G_IO_IN | G_IO_HUP | G_IO_ERR, on_stdin, NULL);
    }
    g_main_loop_run(loop);
    spice_session_disconnect(session);
    return exit_code;
}
