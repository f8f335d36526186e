//! The real `betangctl` binary against an in-process cluster, as an operator
//! would type it: what it prints and how it exits.

use std::process::Output;

use betang_tests::{Cluster, ClusterOptions};

/// Runs `betangctl ARGS` with `token` against the cluster; never reads a
/// config file of the machine's.
async fn betangctl(cluster: &Cluster, token: &str, args: &[&str]) -> anyhow::Result<Output> {
    let bin = betang_tests::chaos::default_bin_dir()?.join("betangctl");
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .env("BETANG_ENDPOINT", &cluster.endpoint)
        .env("BETANG_TOKEN", token)
        .env(
            "BETANG_CONFIG",
            cluster.dir.path().join("no-such-config.toml"),
        )
        .env("HOME", cluster.dir.path())
        .output()
        .await?;
    Ok(out)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Setting one limit changes that limit only, and the institution is found
/// by its code as well as its id; a call that names no limit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_change_touches_only_the_limits_it_names() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let admin = cluster.people.admin.clone();
    let code = format!("{}-a", cluster.prefix);
    let q = ClusterOptions::default().quota;
    let out = betangctl(
        &cluster,
        &admin,
        &["institution", "quota", &code, "--vcpus", "4"],
    )
    .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "used:      0/4 vCPU, 0/{} MiB, 0/{} GiB, 0/{} VPS",
            q.memory_mib, q.disk_gib, q.vps_count
        )),
        "{stdout}"
    );
    let id = cluster.people.inst_a.clone();
    let out = betangctl(
        &cluster,
        &admin,
        &["institution", "quota", &id, "--vps", "3"],
    )
    .await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("/4 vCPU, 0/{} MiB", q.memory_mib)),
        "{stdout}"
    );
    assert!(stdout.contains("0/3 VPS"), "{stdout}");
    let out = betangctl(&cluster, &admin, &["institution", "quota", &code]).await?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("change: name at least one limit"),
        "{stderr}"
    );
    let out = betangctl(
        &cluster,
        &admin,
        &["institution", "quota", "no-such", "--vcpus", "1"],
    )
    .await?;
    assert!(!out.status.success());
    assert!(text(&out).1.contains("not found"), "{}", text(&out).1);
    Ok(())
}

/// A host's allocation reads against what may be placed on it (after the
/// reserve and the overcommit ratio), as placement measures it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_allocation_reads_against_what_may_be_placed() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.people.operator.clone();
    let out = betangctl(&cluster, &op, &["host", "get", &cluster.hosts[0].host_id]).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // 8 vCPUs at the default ratio of 4; memory and disk at ratio 1 (the
    // test controller keeps no reserve).
    assert!(
        stdout.contains("allocated:  0/32 vCPU, 0/16384 MiB, 0/500 GiB (of what may be placed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("capacity:   8 vCPU, 16384 MiB, 500 GiB"),
        "{stdout}"
    );
    Ok(())
}

/// Audit filters as the listing shows them: a username, an action family
/// without its dot, a time written as people write it; seconds given where
/// milliseconds are asked for are refused instead of matching everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_filters_take_usernames_families_and_times() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let op = cluster.people.operator.clone();
    let admin = cluster.people.admin.clone();
    let code = format!("{}-a", cluster.prefix);
    betangctl(
        &cluster,
        &admin,
        &["institution", "quota", &code, "--vcpus", "99"],
    )
    .await?;
    let list = |args: Vec<String>| {
        let (cluster, op) = (&cluster, op.clone());
        async move {
            let mut all = vec!["audit".to_owned(), "list".to_owned()];
            all.extend(args);
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            betangctl(cluster, &op, &refs).await
        }
    };
    let by_name = list(vec!["--actor".into(), "admin".into()]).await?;
    let (stdout, stderr) = text(&by_name);
    assert!(by_name.status.success(), "{stderr}");
    assert!(stdout.contains("institution.set_quota"), "{stdout}");
    let family = list(vec![
        "--action".into(),
        "institution".into(),
        "--since".into(),
        "1h".into(),
    ])
    .await?;
    let (stdout, _) = text(&family);
    assert!(stdout.contains("institution.set_quota"), "{stdout}");
    assert!(stdout.contains("institution.create"), "{stdout}");
    assert!(!stdout.contains("user.create"), "{stdout}");
    let future = list(vec!["--since".into(), "2999-01-01".into()]).await?;
    assert!(future.status.success());
    assert!(
        !text(&future).0.contains("institution."),
        "{}",
        text(&future).0
    );
    let seconds = list(vec!["--since-ms".into(), "1764547200".into()]).await?;
    assert!(!seconds.status.success());
    assert!(
        text(&seconds).1.contains("looks like seconds"),
        "{}",
        text(&seconds).1
    );
    let nonsense = list(vec!["--since".into(), "yesterday-ish".into()]).await?;
    assert!(!nonsense.status.success());
    assert!(
        text(&nonsense).1.contains("--since"),
        "{}",
        text(&nonsense).1
    );
    Ok(())
}

/// What a new user meets first: a hint to log in, a login that checks the
/// token before saving it, errors that say what to do instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_contact_says_what_to_do() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let bin = betang_tests::chaos::default_bin_dir()?.join("betangctl");
    let config = cluster.dir.path().join("betangctl.toml");
    let run = |args: &[&str], token: Option<&str>, stdin: &str| {
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(args)
            .env("BETANG_ENDPOINT", &cluster.endpoint)
            .env("BETANG_CONFIG", &config)
            .env("HOME", cluster.dir.path())
            .env_remove("BETANG_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(t) = token {
            cmd.env("BETANG_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("betangctl");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().expect("betangctl output")
    };
    let out = run(&["--version"], None, "");
    assert!(text(&out).0.starts_with("betangctl "), "{}", text(&out).0);
    let out = run(&["vps", "list"], None, "");
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("betangctl login --token-stdin"),
        "{}",
        text(&out).1
    );
    // A good login is saved; a bad one is refused and changes nothing.
    let member = cluster.people.member_a.clone();
    let out = run(&["login", "--token-stdin"], None, &format!("{member}\n"));
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).0.contains("logged in as"), "{}", text(&out).0);
    let saved = std::fs::read_to_string(&config)?;
    let out = run(&["login", "--token-stdin"], None, "garbage\n");
    assert!(!out.status.success());
    assert!(text(&out).1.contains("unchanged"), "{}", text(&out).1);
    assert_eq!(std::fs::read_to_string(&config)?, saved);
    // A bad token: an error, and no table header before it.
    let out = run(&["vps", "list"], Some("not-a-token"), "");
    assert!(!out.status.success());
    assert!(text(&out).0.is_empty(), "{}", text(&out).0);
    // A waiting request is withdrawn with cancel, and the error says so.
    let mut c = cluster.clients(&member).await?.vps;
    let mut req = cluster.create(cluster.spec("waits"));
    req.institution_id = String::new();
    let v = c.create_vps(req).await?.into_inner();
    let out = run(&["vps", "delete", &v.id], None, "");
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("betangctl vps cancel"),
        "{}",
        text(&out).1
    );
    let out = run(&["vps", "wait", &v.id, "FOO"], None, "");
    assert!(!out.status.success());
    assert!(text(&out).1.contains("not a state"), "{}", text(&out).1);
    // Grammar in refusals.
    let out = run(&["host", "list"], None, "");
    assert!(
        text(&out).1.contains("a member may not do this"),
        "{}",
        text(&out).1
    );
    Ok(())
}

/// An operator decides from the pending list: who asks, for which
/// application, who is responsible; `vps get` says a stop is under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_who_asks_and_what_is_under_way() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let p = &cluster.people;
    let mut member = cluster.clients(&p.member_a).await?.vps;
    let mut req = cluster.create(cluster.spec("asks"));
    req.institution_id = String::new();
    let v = member.create_vps(req).await?.into_inner();
    let out = betangctl(&cluster, &p.operator, &["vps", "list", "--pending"]).await?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&v.id))
        .unwrap_or_else(|| panic!("{stdout}"));
    let code = format!("{}-a", cluster.prefix);
    assert!(row.contains(&code), "institution code: {row}");
    assert!(row.contains("Sistem informasi uji"), "application: {row}");
    assert!(row.contains("Budi"), "responsible: {row}");
    assert!(
        row.contains(&format!("{}-ma", cluster.prefix)),
        "requester: {row}"
    );
    // Creating an institution without its limits is refused.
    let mut admin = cluster.clients(&p.admin).await?.identity;
    let e = admin
        .create_institution(betang_proto::v1::CreateInstitutionRequest {
            code: format!("{}-noq", cluster.prefix),
            name: "Tanpa kuota".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("quota:"), "{}", e.message());
    Ok(())
}

/// `betangctl … | head` ends quietly: no panic about a broken pipe when the
/// reader has gone before it prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_betangctl_quietly() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let bin = betang_tests::chaos::default_bin_dir()?.join("betangctl");
    let err = cluster.dir.path().join("stderr");
    // `true` has exited long before betangctl has its answer to print.
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg("\"$BIN\" whoami 2>\"$ERR\" | true; echo ${PIPESTATUS[0]}")
        .env("BIN", &bin)
        .env("ERR", &err)
        .env("BETANG_ENDPOINT", &cluster.endpoint)
        .env("BETANG_TOKEN", &cluster.people.operator)
        .env("BETANG_CONFIG", cluster.dir.path().join("none.toml"))
        .env("HOME", cluster.dir.path())
        .env_remove("RUST_BACKTRACE")
        .output()
        .await?;
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        std::fs::read_to_string(&err)?,
        "",
        "nothing on standard error"
    );
    // Ended by SIGPIPE (128 + 13), as `cat` or `grep` would be.
    assert_eq!(status, "141");
    Ok(())
}
