//! The README's walkthrough, run as written: every `console` block in
//! README.md is a session with the real `betangctl` against an in-process
//! cluster, and what each command prints must match what the README shows.
//!
//! In the README, `$ ` starts a command (optionally with `BETANG_TOKEN=…`
//! before `betangctl`), and the lines after it, up to the next command, are
//! its output (standard output, then standard error). In both, `{name}` is a
//! value the session learned earlier: the first time it appears in an output
//! it is captured (one word), and from then on it stands for what was
//! captured. `…` in an output matches any text within the line (times and
//! usage figures that differ from run to run). `{admin_token}` is the token
//! of the first admin, which `bootstrap-admin` would print.
//!
//! `BETANG_README_RECORD=1` prints what each command printed instead of
//! comparing, for writing the README.

use std::collections::HashMap;

use betang_tests::{Cluster, ClusterOptions};

struct Step {
    line: usize,
    command: String,
    expected: Vec<String>,
}

/// The `console` blocks of `text`, as commands with their expected output.
fn steps(text: &str) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        if !inside {
            inside = line.trim_end() == "```console";
            continue;
        }
        if line.trim_end() == "```" {
            inside = false;
        } else if let Some(cmd) = line.strip_prefix("$ ") {
            out.push(Step {
                line: i + 1,
                command: cmd.to_owned(),
                expected: Vec::new(),
            });
        } else if let Some(s) = out.last_mut() {
            s.expected.push(line.to_owned());
        }
    }
    out
}

/// `{name}` replaced by what is known; an unknown name is an error.
fn substitute(text: &str, known: &HashMap<String, String>) -> anyhow::Result<String> {
    let re = regex::Regex::new(r"\{([a-z_0-9]+)\}")?;
    let mut missing = None;
    let out = re.replace_all(text, |c: &regex::Captures| match known.get(&c[1]) {
        Some(v) => v.clone(),
        None => {
            missing = Some(c[1].to_owned());
            String::new()
        }
    });
    match missing {
        Some(m) => anyhow::bail!("{{{m}}} is used before it is shown"),
        None => Ok(out.into_owned()),
    }
}

/// A pattern for one expected line: known names as their values, unknown
/// ones captured, `…` as any text.
fn pattern(line: &str, known: &HashMap<String, String>) -> anyhow::Result<regex::Regex> {
    let re = regex::Regex::new(r"\{([a-z_0-9]+)\}|…")?;
    let mut p = String::from("^");
    let mut last = 0;
    let mut seen = std::collections::HashSet::new();
    for m in re.find_iter(line) {
        p.push_str(&regex::escape(&line[last..m.start()]));
        let tok = m.as_str();
        if tok == "…" {
            p.push_str(".*?");
        } else {
            let name = &tok[1..tok.len() - 1];
            match known.get(name) {
                Some(v) => p.push_str(&regex::escape(v)),
                None if seen.insert(name.to_owned()) => {
                    p.push_str(&format!("(?P<{name}>\\S+?)"));
                }
                None => p.push_str(r"\S+"),
            }
        }
        last = m.end();
    }
    p.push_str(&regex::escape(&line[last..]));
    p.push('$');
    Ok(regex::Regex::new(&p)?)
}

fn learn(p: &regex::Regex, c: &regex::Captures, known: &mut HashMap<String, String>) {
    for name in p.capture_names().flatten() {
        if let Some(v) = c.name(name) {
            known.insert(name.to_owned(), v.as_str().to_owned());
        }
    }
}

async fn run(cluster: &Cluster, command: &str, admin: &str) -> anyhow::Result<Vec<String>> {
    let words = shlex::split(command).ok_or_else(|| anyhow::anyhow!("cannot split {command}"))?;
    let mut token = admin.to_owned();
    let mut rest = words.as_slice();
    while let Some((first, tail)) = rest.split_first() {
        match first.split_once('=') {
            Some(("BETANG_TOKEN", t)) => token = t.to_owned(),
            Some(_) => anyhow::bail!("only BETANG_TOKEN may be set: {command}"),
            None => break,
        }
        rest = tail;
    }
    let (program, args) = rest
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("empty command"))?;
    anyhow::ensure!(
        program == "betangctl",
        "only betangctl runs here: {command}"
    );
    let bin = betang_tests::chaos::default_bin_dir()?.join("betangctl");
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(args)
        .env("BETANG_ENDPOINT", &cluster.endpoint)
        .env("BETANG_TOKEN", &token)
        .env(
            "BETANG_CONFIG",
            cluster.dir.path().join("no-such-config.toml"),
        )
        .env("HOME", cluster.dir.path())
        // What a person sees, without a developer's backtraces.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    // Standard output and error into one pipe, in the order a terminal
    // shows them.
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        use std::io::Read;
        let (mut reader, writer) = std::io::pipe()?;
        cmd.stdout(writer.try_clone()?).stderr(writer);
        let mut child = cmd.spawn()?;
        drop(cmd);
        let mut text = String::new();
        reader.read_to_string(&mut text)?;
        child.wait()?;
        Ok(text.lines().map(str::to_owned).collect())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_prints_what_it_says() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(betang_tests::workspace_root().join("README.md"))?;
    let steps = steps(&readme);
    anyhow::ensure!(steps.len() >= 10, "the README's walkthrough is missing");
    let cluster = Cluster::start(ClusterOptions {
        image: "debian-12",
        ..ClusterOptions::default()
    })
    .await?;
    let record = std::env::var_os("BETANG_README_RECORD").is_some();
    let admin = cluster.people.admin.clone();
    let mut known: HashMap<String, String> = HashMap::new();
    known.insert("admin_token".into(), admin.clone());
    for step in &steps {
        let command = match substitute(&step.command, &known) {
            Ok(c) => c,
            Err(e) if record => {
                println!("$ {}\n(not run: {e})", step.command);
                continue;
            }
            Err(e) => return Err(e),
        };
        let got = run(&cluster, &command, &admin).await?;
        if record {
            println!("$ {}", step.command);
            for l in &got {
                println!("{l}");
            }
            // Learn what the README already shows, to run the next steps.
            for (want, have) in step.expected.iter().zip(&got) {
                let p = pattern(want, &known)?;
                if let Some(c) = p.captures(have) {
                    learn(&p, &c, &mut known);
                }
            }
            continue;
        }
        let mismatch = || {
            format!(
                "README.md line {}: `{}` printed\n{}\nbut the README shows\n{}",
                step.line,
                step.command,
                got.join("\n"),
                step.expected.join("\n")
            )
        };
        anyhow::ensure!(got.len() == step.expected.len(), "{}", mismatch());
        for (want, have) in step.expected.iter().zip(&got) {
            let p = pattern(want, &known)?;
            let Some(c) = p.captures(have) else {
                anyhow::bail!("{}", mismatch());
            };
            learn(&p, &c, &mut known);
        }
    }
    Ok(())
}

#[test]
fn patterns_capture_names_and_skip_what_varies() {
    let mut known = HashMap::new();
    let p = pattern("id:        {vps}", &known).unwrap();
    let c = p.captures("id:        0190-ab").unwrap();
    assert_eq!(&c["vps"], "0190-ab");
    known.insert("vps".to_owned(), "0190-ab".to_owned());
    let p = pattern("requested:   by siti at …", &known).unwrap();
    assert!(p.is_match("requested:   by siti at 2026-12-03 12:00:00 UTC"));
    assert!(!p.is_match("requested:   by budi at 2026-12-03 12:00:00 UTC"));
    let p = pattern("{vps} RUNNING", &known).unwrap();
    assert!(p.is_match("0190-ab RUNNING"));
    assert!(!p.is_match("0190-ac RUNNING"));
    assert_eq!(
        substitute("betangctl vps get {vps}", &known).unwrap(),
        "betangctl vps get 0190-ab"
    );
    assert!(substitute("betangctl vps get {other}", &known).is_err());
}
