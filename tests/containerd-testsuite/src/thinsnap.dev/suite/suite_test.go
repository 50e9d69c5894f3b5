// containerd's own snapshotter test suite (github.com/containerd/containerd/snapshots/testsuite,
// containerd 1.6, as Debian packages it), unmodified, against `thinsnap serve` through
// containerd's proxy snapshotter over its socket: every case gets a daemon of its own with
// thinsnap's default configuration and the filesystem THINSNAP_FS (ext4 or xfs).
package suite

import (
	"os"
	"testing"

	"github.com/containerd/containerd/snapshots/testsuite"
)

func TestSnapshotterSuite(t *testing.T) {
	fs := os.Getenv("THINSNAP_FS")
	if fs == "" {
		fs = "ext4"
	}
	testsuite.SnapshotterSuite(t, "thinsnap-"+fs, newSnapshotter(fs))
}
