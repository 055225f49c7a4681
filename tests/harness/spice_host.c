/* spice_host: a minimal SPICE host for conformance tests.
 *
 * Runs a real libspice-server on 127.0.0.1 with a "port" char device named
 * org.spice-space.stream.0 whose guest side is the slave of a raw pty, so a
 * stream agent under test can open the pty as if it were the virtio port.
 *
 * stdout protocol (one line per event, flushed):
 *   READY port=<tcp port> pty=<slave path>
 *   LOG <level> <message>         libspice-server / GLib log records
 *   PROTOCOL_ERROR <message>      the server rejected a message from the guest
 *   STATE <0|1>                   the server enabled/disabled the device
 *   CHANNEL <event> type=<t> id=<i>
 *   PORT <opened|closed>
 *   EXIT <status>
 * stdin commands (one per line): "reopen", "close", "open".
 *
 * --follow-guest: the port opens and closes as the guest opens and closes the
 * pty slave (seen with inotify), as QEMU turns a guest's open and close of the
 * virtio port into OPENED and CLOSED: a guest that reopens the port resets the
 * host's side. Without it the port is opened once at start.
 *
 * Usage: spice_host [--debug] [--follow-guest]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <glib.h>
#include <netinet/in.h>
#include <signal.h>
#include <spice.h>
#include <spice/protocol.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

static GMainLoop *loop;
static gboolean debug_logs;
static gboolean follow_guest;
static int guest_opens;
static int pty_master = -1;
/* Kept open so that the master never sees a hang-up while no guest holds the
 * slave; otherwise the read watch would spin on POLLHUP between guests. */
static int pty_slave = -1;
static guint read_watch_id;
static guint write_watch_id;
static SpiceServer *server;

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

/* ---- logging: every record becomes one line so the test can match it ---- */

static const char *level_name(GLogLevelFlags level)
{
    if (level & G_LOG_LEVEL_ERROR) return "error";
    if (level & G_LOG_LEVEL_CRITICAL) return "critical";
    if (level & G_LOG_LEVEL_WARNING) return "warning";
    if (level & G_LOG_LEVEL_MESSAGE) return "message";
    if (level & G_LOG_LEVEL_INFO) return "info";
    return "debug";
}

static void emit_log(GLogLevelFlags level, const char *message)
{
    if (!debug_logs && (level & (G_LOG_LEVEL_DEBUG | G_LOG_LEVEL_INFO))) {
        return;
    }
    /* A record spanning lines would break the line protocol. */
    gchar *flat = g_strdup(message ? message : "");
    for (gchar *p = flat; *p; p++) {
        if (*p == '\n' || *p == '\r') *p = ' ';
    }
    emit("LOG %s %s", level_name(level), flat);
    if (strstr(flat, "Stream device received invalid message")) {
        emit("PROTOCOL_ERROR %s", flat);
    }
    g_free(flat);
}

static void log_handler(const gchar *domain, GLogLevelFlags level, const gchar *message,
                        gpointer data)
{
    (void)domain;
    (void)data;
    emit_log(level, message);
}

static GLogWriterOutput log_writer(GLogLevelFlags level, const GLogField *fields, gsize n,
                                   gpointer data)
{
    (void)data;
    const char *message = NULL;
    for (gsize i = 0; i < n; i++) {
        if (g_strcmp0(fields[i].key, "MESSAGE") == 0) {
            message = fields[i].value;
        }
    }
    emit_log(level, message);
    return G_LOG_WRITER_HANDLED;
}

/* ---- SpiceCoreInterface on the default GMainContext ---- */

struct SpiceTimer {
    SpiceTimerFunc func;
    void *opaque;
    GSource *source;
};

static gboolean timer_dispatch(gpointer data)
{
    SpiceTimer *t = data;
    g_source_unref(t->source);
    t->source = NULL;
    /* func may re-arm or remove the timer: do not touch t afterwards. */
    t->func(t->opaque);
    return G_SOURCE_REMOVE;
}

static SpiceTimer *timer_add(SpiceTimerFunc func, void *opaque)
{
    SpiceTimer *t = g_new0(SpiceTimer, 1);
    t->func = func;
    t->opaque = opaque;
    return t;
}

static void timer_cancel(SpiceTimer *t)
{
    if (t->source) {
        g_source_destroy(t->source);
        g_source_unref(t->source);
        t->source = NULL;
    }
}

static void timer_start(SpiceTimer *t, uint32_t ms)
{
    timer_cancel(t);
    t->source = g_timeout_source_new(ms);
    g_source_set_callback(t->source, timer_dispatch, t, NULL);
    g_source_attach(t->source, NULL);
}

static void timer_remove(SpiceTimer *t)
{
    timer_cancel(t);
    g_free(t);
}

struct SpiceWatch {
    int fd;
    int mask;
    SpiceWatchFunc func;
    void *opaque;
    guint source_id;
};

static gboolean watch_dispatch(gint fd, GIOCondition cond, gpointer data)
{
    SpiceWatch *w = data;
    int event = 0;
    if (cond & (G_IO_IN | G_IO_HUP | G_IO_ERR)) event |= SPICE_WATCH_EVENT_READ;
    if (cond & G_IO_OUT) event |= SPICE_WATCH_EVENT_WRITE;
    /* The server wants only the events it asked for. */
    event &= w->mask;
    if (event) {
        w->func(fd, event, w->opaque);
    }
    return G_SOURCE_CONTINUE;
}

static void watch_arm(SpiceWatch *w)
{
    if (w->source_id) {
        g_source_remove(w->source_id);
        w->source_id = 0;
    }
    GIOCondition cond = 0;
    if (w->mask & SPICE_WATCH_EVENT_READ) cond |= G_IO_IN | G_IO_HUP | G_IO_ERR;
    if (w->mask & SPICE_WATCH_EVENT_WRITE) cond |= G_IO_OUT;
    if (cond) {
        w->source_id = g_unix_fd_add(w->fd, cond, watch_dispatch, w);
    }
}

static SpiceWatch *watch_add(int fd, int mask, SpiceWatchFunc func, void *opaque)
{
    SpiceWatch *w = g_new0(SpiceWatch, 1);
    w->fd = fd;
    w->mask = mask;
    w->func = func;
    w->opaque = opaque;
    watch_arm(w);
    return w;
}

static void watch_update_mask(SpiceWatch *w, int mask)
{
    if (w->mask == mask && (w->source_id || !mask)) return;
    w->mask = mask;
    watch_arm(w);
}

static void watch_remove(SpiceWatch *w)
{
    if (w->source_id) g_source_remove(w->source_id);
    g_free(w);
}

static void channel_event(int event, SpiceChannelEventInfo *info)
{
    const char *name = event == SPICE_CHANNEL_EVENT_CONNECTED     ? "connected"
                       : event == SPICE_CHANNEL_EVENT_INITIALIZED ? "initialized"
                       : event == SPICE_CHANNEL_EVENT_DISCONNECTED ? "disconnected"
                                                                   : "other";
    emit("CHANNEL %s type=%d id=%d", name, info->type, info->id);
}

static SpiceCoreInterface core = {
    .base = {
        .type = SPICE_INTERFACE_CORE,
        .description = "spice_host glib core",
        .major_version = SPICE_INTERFACE_CORE_MAJOR,
        .minor_version = SPICE_INTERFACE_CORE_MINOR,
    },
    .timer_add = timer_add,
    .timer_start = timer_start,
    .timer_cancel = timer_cancel,
    .timer_remove = timer_remove,
    .watch_add = watch_add,
    .watch_update_mask = watch_update_mask,
    .watch_remove = watch_remove,
    .channel_event = channel_event,
};

/* ---- the stream port, backed by the pty master ---- */

static SpiceCharDeviceInstance port_sin;

static gboolean on_pty_readable(gint fd, GIOCondition cond, gpointer data);
static gboolean on_pty_writable(gint fd, GIOCondition cond, gpointer data);

/* Level-triggered watches would spin while the server declines to read (flow
 * control, closed port), so the read watch is one-shot: it is re-armed only
 * once a read has drained the pty. */
static void arm_read_watch(void)
{
    if (!read_watch_id) {
        read_watch_id = g_unix_fd_add(pty_master, G_IO_IN, on_pty_readable, NULL);
    }
}

static gboolean on_pty_readable(gint fd, GIOCondition cond, gpointer data)
{
    (void)fd;
    (void)cond;
    (void)data;
    read_watch_id = 0;
    spice_server_char_device_wakeup(&port_sin);
    return G_SOURCE_REMOVE;
}

static gboolean on_pty_writable(gint fd, GIOCondition cond, gpointer data)
{
    (void)fd;
    (void)cond;
    (void)data;
    write_watch_id = 0;
    spice_server_char_device_wakeup(&port_sin);
    return G_SOURCE_REMOVE;
}

static int port_read(SpiceCharDeviceInstance *sin, uint8_t *buf, int len)
{
    (void)sin;
    if (len <= 0) return 0;
    ssize_t n = read(pty_master, buf, len);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR || errno == EIO) {
            arm_read_watch();
            return 0;
        }
        emit("LOG error host read: %s", g_strerror(errno));
        return -1;
    }
    if (n < len) arm_read_watch();
    return (int)n;
}

static int port_write(SpiceCharDeviceInstance *sin, const uint8_t *buf, int len)
{
    (void)sin;
    if (len <= 0) return 0;
    ssize_t n = write(pty_master, buf, len);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            emit("LOG error host write: %s", g_strerror(errno));
            return -1;
        }
        n = 0;
    }
    /* With NOTIFY_WRITABLE the server waits for a wakeup after a short write. */
    if (n < len && !write_watch_id) {
        write_watch_id = g_unix_fd_add(pty_master, G_IO_OUT, on_pty_writable, NULL);
    }
    return (int)n;
}

static void port_state(SpiceCharDeviceInstance *sin, int connected)
{
    (void)sin;
    emit("STATE %d", connected ? 1 : 0);
}

static void port_event(SpiceCharDeviceInstance *sin, uint8_t event)
{
    (void)sin;
    emit("LOG debug port event %u", event);
}

static SpiceCharDeviceInterface port_sif = {
    .base = {
        .type = SPICE_INTERFACE_CHAR_DEVICE,
        .description = "spice_host stream port",
        .major_version = SPICE_INTERFACE_CHAR_DEVICE_MAJOR,
        .minor_version = SPICE_INTERFACE_CHAR_DEVICE_MINOR,
    },
    .state = port_state,
    .write = port_write,
    .read = port_read,
    .event = port_event,
    .flags = SPICE_CHAR_DEVICE_NOTIFY_WRITABLE,
};

static void port_open(gboolean opened)
{
    spice_server_port_event(&port_sin, opened ? SPICE_PORT_EVENT_OPENED : SPICE_PORT_EVENT_CLOSED);
    emit("PORT %s", opened ? "opened" : "closed");
    arm_read_watch();
}

static char *open_pty(void)
{
    pty_master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (pty_master < 0 || grantpt(pty_master) < 0 || unlockpt(pty_master) < 0) {
        return NULL;
    }
    char *path = g_strdup(ptsname(pty_master));
    pty_slave = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (pty_slave < 0) return NULL;
    struct termios tio;
    if (tcgetattr(pty_slave, &tio) < 0) return NULL;
    cfmakeraw(&tio);
    if (tcsetattr(pty_slave, TCSANOW, &tio) < 0) return NULL;
    /* Everyone may open it: the worker under test may run as another uid. */
    if (chmod(path, 0666) < 0) return NULL;
    int flags = fcntl(pty_master, F_GETFL);
    fcntl(pty_master, F_SETFL, flags | O_NONBLOCK);
    return path;
}

static gboolean on_inotify(gint fd, GIOCondition cond, gpointer data)
{
    (void)cond;
    (void)data;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    ssize_t n = read(fd, buf, sizeof(buf));
    for (char *p = buf; n > 0 && p < buf + n;) {
        struct inotify_event *ev = (struct inotify_event *)p;
        if (ev->mask & IN_OPEN) {
            if (guest_opens++ == 0) port_open(TRUE);
        } else if (ev->mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE)) {
            if (guest_opens > 0 && --guest_opens == 0) port_open(FALSE);
        }
        p += sizeof(*ev) + ev->len;
    }
    return G_SOURCE_CONTINUE;
}

/* ---- control ---- */

static gboolean on_stdin(gint fd, GIOCondition cond, gpointer data)
{
    (void)data;
    static GString *line;
    if (!line) line = g_string_new(NULL);
    char buf[256];
    ssize_t n = (cond & G_IO_IN) ? read(fd, buf, sizeof(buf)) : 0;
    if (n <= 0) {
        /* Parent gone or closed our stdin: nothing left to obey. */
        return G_SOURCE_REMOVE;
    }
    g_string_append_len(line, buf, n);
    char *nl;
    while ((nl = memchr(line->str, '\n', line->len)) != NULL) {
        gchar *cmd = g_strndup(line->str, nl - line->str);
        g_strstrip(cmd);
        if (g_str_equal(cmd, "reopen")) {
            port_open(FALSE);
            port_open(TRUE);
        } else if (g_str_equal(cmd, "close")) {
            port_open(FALSE);
        } else if (g_str_equal(cmd, "open")) {
            port_open(TRUE);
        } else if (*cmd) {
            emit("LOG warning unknown command %s", cmd);
        }
        g_free(cmd);
        g_string_erase(line, 0, nl - line->str + 1);
    }
    if (line->len > 4096) g_string_truncate(line, 0);
    return G_SOURCE_CONTINUE;
}

static gboolean on_sigterm(gpointer data)
{
    (void)data;
    g_main_loop_quit(loop);
    return G_SOURCE_REMOVE;
}

static int free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t l = sizeof(a);
    int port = -1;
    if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(s, (struct sockaddr *)&a, &l) == 0) {
        port = ntohs(a.sin_port);
    }
    if (s >= 0) close(s);
    return port;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (g_str_equal(argv[i], "--debug")) debug_logs = TRUE;
        if (g_str_equal(argv[i], "--follow-guest")) follow_guest = TRUE;
    }
    g_log_set_default_handler(log_handler, NULL);
    g_log_set_writer_func(log_writer, NULL, NULL);
    signal(SIGPIPE, SIG_IGN);

    loop = g_main_loop_new(NULL, FALSE);

    char *pty_path = open_pty();
    if (!pty_path) {
        emit("FATAL cannot open pty: %s", g_strerror(errno));
        return 1;
    }

    /* The port is picked before the server binds it, so another process may
     * take it in between: try a few. */
    int port = -1;
    for (int attempt = 0; attempt < 10 && !server; attempt++) {
        port = free_port();
        SpiceServer *s = spice_server_new();
        spice_server_set_addr(s, "127.0.0.1", 0);
        spice_server_set_port(s, port);
        spice_server_set_noauth(s);
        if (spice_server_init(s, &core) == 0) {
            server = s;
        }
    }
    if (!server) {
        emit("FATAL cannot start the SPICE server");
        return 1;
    }

    port_sin.base.sif = &port_sif.base;
    port_sin.subtype = "port";
    port_sin.portname = "org.spice-space.stream.0";
    if (spice_server_add_interface(server, &port_sin.base) != 0) {
        emit("FATAL cannot add the stream port");
        return 1;
    }
    if (follow_guest) {
        /* Our own slave fd was opened before the watch: only guests' opens count. */
        int ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (ino < 0 || inotify_add_watch(ino, pty_path, IN_OPEN | IN_CLOSE) < 0) {
            emit("FATAL cannot watch %s: %s", pty_path, g_strerror(errno));
            return 1;
        }
        g_unix_fd_add(ino, G_IO_IN, on_inotify, NULL);
    } else {
        port_open(TRUE);
    }

    g_unix_signal_add(SIGTERM, on_sigterm, NULL);
    g_unix_signal_add(SIGINT, on_sigterm, NULL);
    g_unix_fd_add(STDIN_FILENO, G_IO_IN | G_IO_HUP, on_stdin, NULL);

    emit("READY port=%d pty=%s", port, pty_path);
    g_main_loop_run(loop);

    /* spice_server_destroy is skipped: the process exits right away and the
     * kernel closes the sockets; destroying mid-stream has crashed in some
     * releases, which would turn a clean stop into a test failure. */
    emit("EXIT 0");
    return 0;
}
