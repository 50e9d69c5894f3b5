// A `thinsnap serve` process for containerd's own test code: its own configuration (the
// defaults, with the state, runtime directory and socket in a directory of the test's and a
// pool name of its own), readiness by sd_notify, and on stop the checks the Rust fixtures
// make, before anything is cleaned up: `thinsnap check` finds the store and the pool in
// agreement and nothing is left in the private mount directory; after `thinsnap pool
// destroy`, no dm device, loop device or mount of it is left.
package suite

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// thinsnapBin is the thinsnap binary (THINSNAP_BIN).
func thinsnapBin() string {
	if b := os.Getenv("THINSNAP_BIN"); b != "" {
		return b
	}
	return "thinsnap"
}

var pools int64

// daemon is one `thinsnap serve` on its own loopback pool.
type daemon struct {
	dir    string
	config string
	socket string
	pool   string
	log    string
	cmd    *exec.Cmd
	exited chan error
	// notify is the NOTIFY_SOCKET of the running daemon, kept until it exits.
	notify *net.UnixConn
	// listener, when set, is the socket this test holds as systemd would, passed to
	// every start of the daemon (socket activation).
	listener *os.File
}

// newDaemon writes the configuration of a daemon in dir with filesystem fs.
func newDaemon(dir, fs string) (*daemon, error) {
	d := &daemon{
		dir:    dir,
		config: filepath.Join(dir, "config.toml"),
		socket: filepath.Join(dir, "thinsnap.sock"),
		pool:   fmt.Sprintf("suite_%d_%d", os.Getpid(), atomic.AddInt64(&pools, 1)),
		log:    filepath.Join(dir, "daemon.log"),
	}
	config := fmt.Sprintf(
		"state_dir = %q\nsocket = %q\nruntime_dir = %q\nfilesystem = %q\n[pool]\nname = %q\n",
		filepath.Join(dir, "state"), d.socket, filepath.Join(dir, "run"), fs, d.pool)
	if err := os.WriteFile(d.config, []byte(config), 0o600); err != nil {
		return nil, err
	}
	return d, nil
}

// cli runs the thinsnap CLI on the daemon's configuration.
func (d *daemon) cli(args ...string) (string, error) {
	out, err := exec.Command(thinsnapBin(), append([]string{"--config", d.config}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("thinsnap %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// start runs `thinsnap serve` and waits for its READY=1 on NOTIFY_SOCKET (as systemd's
// Type=notify does), or for it to exit, within 300 s.
func (d *daemon) start() error {
	notifyPath := filepath.Join(d.dir, "notify")
	os.Remove(notifyPath)
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		return err
	}
	d.notify = notify
	log, err := os.OpenFile(d.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	serve := fmt.Sprintf("exec %q --config %q serve", thinsnapBin(), d.config)
	env := append(os.Environ(), "NOTIFY_SOCKET="+notifyPath)
	var extra []*os.File
	if d.listener != nil {
		// systemd sets LISTEN_PID to the pid it execs: the shell's, which exec keeps.
		serve = "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=thinsnap.socket " + serve
		extra = []*os.File{d.listener}
	}
	cmd := exec.Command("sh", "-c", serve)
	cmd.Env = env
	cmd.ExtraFiles = extra
	cmd.Stdout, cmd.Stderr = log, log
	d.mark("starting thinsnap serve")
	if err := cmd.Start(); err != nil {
		d.closeNotify()
		return err
	}
	d.cmd = cmd
	d.exited = make(chan error, 1)
	go func() { d.exited <- cmd.Wait() }()
	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := notify.ReadFromUnix(buf)
			if err != nil {
				ready <- err
				return
			}
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if line == "READY=1" {
					ready <- nil
					return
				}
			}
		}
	}()
	select {
	case err := <-ready:
		return err
	case err := <-d.exited:
		d.cmd = nil
		d.closeNotify()
		return fmt.Errorf("thinsnap serve exited before it was ready (%v):\n%s", err, d.logText())
	case <-time.After(300 * time.Second):
		return fmt.Errorf("thinsnap serve was not ready within 300 s:\n%s", d.logText())
	}
}

func (d *daemon) closeNotify() {
	if d.notify != nil {
		d.notify.Close()
		os.Remove(d.notify.LocalAddr().String())
		d.notify = nil
	}
}

// mark appends what the harness did, with the time, to the daemon's log.
func (d *daemon) mark(what string) {
	if f, err := os.OpenFile(d.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600); err == nil {
		fmt.Fprintf(f, "%s harness: %s\n", time.Now().UTC().Format("2006-01-02T15:04:05.000000Z"), what)
		f.Close()
	}
}

func (d *daemon) logText() string {
	b, _ := os.ReadFile(d.log)
	return string(b)
}

// stop sends SIGTERM and waits for a clean exit.
func (d *daemon) stop() error {
	if d.cmd == nil {
		return nil
	}
	cmd := d.cmd
	d.cmd = nil
	defer d.closeNotify()
	d.mark("SIGTERM")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case err := <-d.exited:
		d.mark("thinsnap serve exited")
		if err != nil {
			return fmt.Errorf("thinsnap serve exited with %v:\n%s", err, d.logText())
		}
		return nil
	case <-time.After(120 * time.Second):
		cmd.Process.Kill()
		return fmt.Errorf("thinsnap serve did not stop within 120 s of SIGTERM:\n%s", d.logText())
	}
}

// finish stops the daemon and checks what the test left before cleaning up: the store and
// the pool agree and the private mount directory is empty; then it destroys the pool and
// checks that nothing of it is left.
func (d *daemon) finish() error {
	if err := d.stop(); err != nil {
		return err
	}
	out, err := d.cli("check")
	if err != nil {
		return err
	}
	if !strings.Contains(out, "store and pool agree") {
		return fmt.Errorf("thinsnap check after the test:\n%s", out)
	}
	if left, _ := os.ReadDir(filepath.Join(d.dir, "run", "mnt")); len(left) > 0 {
		return fmt.Errorf("private mounts left behind: %v", left)
	}
	for _, m := range mountsUnder(d.dir) {
		syscall.Unmount(m, syscall.MNT_DETACH)
	}
	if _, err := d.cli("pool", "destroy", "--force"); err != nil {
		return err
	}
	if left := dmDevicesOf(d.pool); len(left) > 0 {
		return fmt.Errorf("dm devices left behind: %v", left)
	}
	if left := loopsUnder(d.dir); len(left) > 0 {
		return fmt.Errorf("loop devices left behind: %v", left)
	}
	if left := mountsUnder(d.dir); len(left) > 0 {
		return fmt.Errorf("mounts left behind: %v", left)
	}
	return nil
}

// dial connects to socket exactly as containerd 1.6 connects to a proxy plugin
// (services/server/server.go, proxyClients.getClient).
func dial(socket string) (*grpc.ClientConn, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	connParams := grpc.ConnectParams{
		Backoff: backoffConfig,
	}
	gopts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithConnectParams(connParams),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	}
	return grpc.Dial(dialer.DialAddress(socket), gopts...)
}

// snapshotter is containerd's proxy snapshotter on the daemon's socket, as containerd
// registers a `proxy_plugins` entry.
func (d *daemon) snapshotter() (snapshots.Snapshotter, *grpc.ClientConn, error) {
	conn, err := dial(d.socket)
	if err != nil {
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinsnap"), conn, nil
}

func dmDevicesOf(pool string) []string {
	prefix := "thinsnap-" + pool + "-"
	var out []string
	names, _ := filepath.Glob("/sys/block/dm-*/dm/name")
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), prefix) {
			out = append(out, strings.TrimSpace(string(b)))
		}
	}
	return out
}

func loopsUnder(dir string) []string {
	var out []string
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			out = append(out, f)
		}
	}
	return out
}

func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir) {
			out = append([]string{fields[4]}, out...)
		}
	}
	return out
}

// newSnapshotter is a testsuite.SnapshotterFunc: a fresh daemon with filesystem fs in the
// suite's root, and containerd's proxy snapshotter on it.
func newSnapshotter(fs string) func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		d, err := newDaemon(root, fs)
		if err != nil {
			return nil, nil, err
		}
		if err := d.start(); err != nil {
			return nil, nil, err
		}
		sn, conn, err := d.snapshotter()
		if err != nil {
			d.finish()
			return nil, nil, err
		}
		return sn, func() error {
			sn.Close()
			conn.Close()
			return d.finish()
		}, nil
	}
}
