//! The Debian package (`packaging/build-deb`): its file list, conffile, dependencies, the
//! systemd units (socket activation, readiness, ordering, and nothing that can stop
//! containerd), and that the packaged binary accepts the packaged
//! configuration. Runs on the host (it needs dpkg-deb, not device-mapper): `vagrant/test`
//! builds the package and runs this with `THINSNAP_DEB` naming it.

use std::{path::PathBuf, process::Command};

fn deb() -> PathBuf {
    let p = std::env::var_os("THINSNAP_DEB").map(PathBuf::from).unwrap_or_else(|| {
        panic!("THINSNAP_DEB is not set: build the package with packaging/build-deb and run THINSNAP_DEB=<its path> cargo test --test package")
    });
    assert!(p.is_file(), "{} does not exist", p.display());
    p
}

fn dpkg_deb(args: &[&str]) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .output()
        .expect("dpkg-deb must be installed");
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn deb_holds_binary_unit_config_man_pages_and_completions() {
    let deb = deb();
    let deb = deb.to_str().unwrap();
    let listing = dpkg_deb(&["-c", deb]);
    // "-rwxr-xr-x root/root 123 2026-11-25 12:00 ./usr/bin/thinsnap"
    let files: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let mode = l.split_whitespace().next()?;
            let path = l.split_whitespace().nth(5)?.trim_start_matches('.');
            (!mode.starts_with('d')).then_some((path, mode))
        })
        .collect();
    let mode_of = |p: &str| {
        files
            .iter()
            .find(|(f, _)| *f == p)
            .map(|(_, m)| *m)
            .unwrap_or_else(|| panic!("{p} is not in the package:\n{listing}"))
    };
    assert_eq!(mode_of("/usr/bin/thinsnap"), "-rwxr-xr-x");
    for f in [
        "/etc/thinsnap/config.toml",
        "/usr/lib/systemd/system/thinsnap.service",
        "/usr/lib/systemd/system/thinsnap.socket",
        "/usr/share/bash-completion/completions/thinsnap",
        "/usr/share/zsh/vendor-completions/_thinsnap",
        "/usr/share/fish/vendor_completions.d/thinsnap.fish",
        "/usr/share/doc/thinsnap/README.md",
        "/usr/share/doc/thinsnap/containerd.md",
        "/usr/share/doc/thinsnap/operations.md",
        "/usr/share/doc/thinsnap/copyright",
    ] {
        assert_eq!(mode_of(f), "-rw-r--r--", "{f}");
    }
    // A man page for the command and for its subcommands, compressed.
    let man: Vec<&str> = files
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| f.starts_with("/usr/share/man/man1/"))
        .collect();
    assert!(
        man.contains(&"/usr/share/man/man1/thinsnap.1.gz"),
        "{man:?}"
    );
    for sub in ["serve", "pool", "snapshot", "image", "gc", "status"] {
        let page = format!("/usr/share/man/man1/thinsnap-{sub}.1.gz");
        assert!(man.contains(&page.as_str()), "{page} missing: {man:?}");
    }
    // Nothing else: every file is accounted for.
    let known = |f: &str| {
        f == "/usr/bin/thinsnap"
            || f.starts_with("/usr/share/man/man1/thinsnap")
            || f.starts_with("/usr/share/doc/thinsnap/")
            || f.starts_with("/usr/share/bash-completion/")
            || f.starts_with("/usr/share/zsh/")
            || f.starts_with("/usr/share/fish/")
            || f == "/etc/thinsnap/config.toml"
            || f == "/usr/lib/systemd/system/thinsnap.service"
            || f == "/usr/lib/systemd/system/thinsnap.socket"
    };
    let unknown: Vec<&str> = files
        .iter()
        .map(|(f, _)| *f)
        .filter(|f| !known(f))
        .collect();
    assert!(unknown.is_empty(), "unexpected files {unknown:?}");

    // Control data: dependencies, conffile, the unit enabled by the maintainer scripts.
    let depends = dpkg_deb(&["-f", deb, "Depends"]);
    for d in ["thin-provisioning-tools", "e2fsprogs", "libc6"] {
        assert!(depends.contains(d), "Depends: {depends}");
    }
    assert_eq!(
        dpkg_deb(&["-I", deb, "conffiles"]).trim(),
        "/etc/thinsnap/config.toml"
    );
    let postinst = dpkg_deb(&["-I", deb, "postinst"]);
    for unit in ["thinsnap.service", "thinsnap.socket"] {
        assert!(
            postinst.contains("deb-systemd-helper") && postinst.contains(unit),
            "{unit} is not enabled: {postinst}"
        );
    }

    // The unit and the configuration, as installed.
    let root = tempfile::tempdir().unwrap();
    dpkg_deb(&["-x", deb, root.path().to_str().unwrap()]);
    let unit = std::fs::read_to_string(root.path().join("usr/lib/systemd/system/thinsnap.service"))
        .unwrap();
    let has = |text: &str, line: &str| text.lines().any(|l| l.trim() == line);
    for line in [
        "ExecStart=/usr/bin/thinsnap serve",
        "Type=notify",
        "UMask=0077",
        "Requires=thinsnap.socket",
        "Before=containerd.service",
        "WantedBy=multi-user.target containerd.service",
    ] {
        assert!(has(&unit, line), "{line} not in the unit:\n{unit}");
    }
    // No unit thinsnap ships can stop containerd: containerd wants thinsnap, nothing of
    // thinsnap's requires or binds containerd, or is required by it.
    let socket =
        std::fs::read_to_string(root.path().join("usr/lib/systemd/system/thinsnap.socket"))
            .unwrap();
    for (name, text) in [("thinsnap.service", &unit), ("thinsnap.socket", &socket)] {
        for l in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let (key, value) = l.split_once('=').unwrap_or((l, ""));
            let strong = matches!(
                key.trim(),
                "RequiredBy"
                    | "Requires"
                    | "BindsTo"
                    | "PartOf"
                    | "Requisite"
                    | "UpheldBy"
                    | "Upholds"
            );
            assert!(
                !(strong && value.contains("containerd")),
                "{name} ties containerd to thinsnap: {l}"
            );
        }
    }
    assert!(
        has(&socket, "ListenStream=/run/thinsnap/thinsnap.sock")
            && has(&socket, "SocketMode=0660")
            && has(&socket, "WantedBy=sockets.target"),
        "thinsnap.socket:\n{socket}"
    );
    let config = root.path().join("etc/thinsnap/config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.lines().filter(|l| l.starts_with('#')).count() > 30,
        "commented"
    );
    assert!(
        has(&text, "socket = \"/run/thinsnap/thinsnap.sock\""),
        "the configuration's socket is the one thinsnap.socket listens on"
    );
    let out = Command::new(root.path().join("usr/bin/thinsnap"))
        .arg("--config")
        .arg(&config)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the packaged binary rejects the packaged configuration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
