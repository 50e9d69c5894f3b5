// Restarts containerd never notices: this test holds thinsnap's listening socket the way
// systemd's thinsnap.socket does, passes it to every start of `thinsnap serve` (LISTEN_FDS,
// readiness by sd_notify, as Type=notify), and restarts thinsnap 5 times while a client
// dialled exactly as containerd dials a proxy plugin issues Stat, Prepare, Commit and
// Remove in a loop. Every request must succeed, including those issued while thinsnap was
// down, and at the end exactly what the loop left must be there.
package suite

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
)

func TestRestartsUnnoticed(t *testing.T) {
	const restarts = 5
	dir, err := os.MkdirTemp("", "thinsnap-restart-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	d, err := newDaemon(dir, "ext4")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: d.socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if d.listener, err = l.File(); err != nil {
		t.Fatal(err)
	}
	if err := d.start(); err != nil {
		t.Fatal(err)
	}
	sn, conn, err := d.snapshotter()
	if err != nil {
		t.Fatal(err)
	}
	ctx := namespaces.WithNamespace(context.Background(), "restart")
	if _, err := sn.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}

	type request struct {
		start, end time.Time
		what       string
		err        error
	}
	var (
		mu   sync.Mutex
		done []request
		stop = make(chan struct{})
		wg   sync.WaitGroup
	)
	call := func(what string, f func(context.Context) error) {
		c, cancel := context.WithTimeout(ctx, 90*time.Second)
		defer cancel()
		r := request{start: time.Now(), what: what}
		r.err = f(c)
		r.end = time.Now()
		mu.Lock()
		done = append(done, r)
		mu.Unlock()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			active, name := fmt.Sprintf("active-%d", i), fmt.Sprintf("layer-%d", i)
			call("Prepare "+active, func(c context.Context) error {
				_, err := sn.Prepare(c, active, "base")
				return err
			})
			call("Stat "+active, func(c context.Context) error {
				info, err := sn.Stat(c, active)
				if err == nil && (info.Kind != snapshots.KindActive || info.Parent != "base") {
					err = fmt.Errorf("stat %s: %+v", active, info)
				}
				return err
			})
			call("Commit "+name, func(c context.Context) error { return sn.Commit(c, name, active) })
			call("Remove "+name, func(c context.Context) error { return sn.Remove(c, name) })
		}
	}()

	// Each restart as systemd does it: SIGTERM, wait for the exit, start, wait for READY=1.
	type window struct{ down, up time.Time }
	var windows []window
	for i := 0; i < restarts; i++ {
		time.Sleep(3 * time.Second)
		w := window{down: time.Now()}
		if err := d.stop(); err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		if err := d.start(); err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		w.up = time.Now()
		windows = append(windows, w)
		t.Logf("restart %d: thinsnap was down for %.2f s", i+1, w.up.Sub(w.down).Seconds())
	}
	time.Sleep(3 * time.Second)
	close(stop)
	wg.Wait()

	failed := 0
	for _, r := range done {
		if r.err != nil {
			failed++
			t.Errorf("%s failed after %.2f s: %v", r.what, r.end.Sub(r.start).Seconds(), r.err)
		}
	}
	for i, w := range windows {
		waited := 0
		for _, r := range done {
			if r.start.Before(w.up) && r.end.After(w.down) {
				waited++
			}
		}
		if waited == 0 {
			t.Errorf("restart %d: no request was under way while thinsnap restarted", i+1)
		}
	}
	t.Logf("%d requests over %d restarts, %d failed", len(done), restarts, failed)
	if failed > 0 {
		t0 := windows[0].down.Add(-3 * time.Second)
		for i, w := range windows {
			t.Logf("restart %d: down at %.2f, up at %.2f", i+1, w.down.Sub(t0).Seconds(), w.up.Sub(t0).Seconds())
		}
		last := ""
		for _, r := range done {
			state := "ok"
			if r.err != nil {
				state = r.err.Error()
			}
			if state != last {
				t.Logf("%.2f-%.2f %s: %s", r.start.Sub(t0).Seconds(), r.end.Sub(t0).Seconds(), r.what, state)
				last = state
			}
		}
		t.Logf("daemon log:\n%s", d.logText())
	}
	fmt.Printf("restarts: %d requests over %d restarts, %d failed\n", len(done), restarts, failed)

	// Nothing lost and nothing left over: only the base layer remains.
	var left []string
	if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		left = append(left, info.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || left[0] != "base" {
		t.Errorf("snapshots after the loop: %v (want only base)", left)
	}
	if err := sn.Remove(ctx, "base"); err != nil {
		t.Error(err)
	}
	conn.Close()
	if err := d.finish(); err != nil {
		t.Error(err)
	}
	// systemd keeps the socket; the daemon left it where it was.
	if _, err := os.Stat(filepath.Join(dir, "thinsnap.sock")); err != nil {
		t.Errorf("the held socket is gone: %v", err)
	}
}
