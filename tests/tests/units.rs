//! The systemd units keep their hardening: `systemd-analyze security`
//! (offline, on the files in `deploy/systemd/`) rates the controller, which
//! runs as its own user, and the agent, which must stay root, within the
//! bounds the README states.

use std::process::Command;

use betang_tests::workspace_root;

/// The overall exposure `systemd-analyze security` gives a unit file.
fn exposure(unit: &str) -> anyhow::Result<(f64, String)> {
    let path = workspace_root().join("deploy/systemd").join(unit);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("systemd-analyze: {e} (package systemd; deploy/test.sh installs it)")
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .ok_or_else(|| anyhow::anyhow!("no overall exposure in: {text}"))?;
    let figure = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read {line}"))?;
    Ok((figure, text))
}

fn setting<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_controller_runs_unprivileged_and_both_units_are_hardened() -> anyhow::Result<()> {
    let (controller, report) = exposure("betang-controller.service")?;
    assert!(
        controller <= 2.0,
        "controller exposure {controller}:\n{report}"
    );
    let (agent, report) = exposure("betang-agent.service")?;
    assert!(agent <= 3.0, "agent exposure {agent}:\n{report}");

    let unit =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/betang-controller.service"))?;
    assert_eq!(setting(&unit, "User"), ["betang"]);
    assert_eq!(setting(&unit, "CapabilityBoundingSet"), [""]);
    assert_eq!(setting(&unit, "UMask"), ["0077"]);
    assert_eq!(setting(&unit, "StateDirectoryMode"), ["0700"]);
    let agent_unit =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/betang-agent.service"))?;
    // Stopping the agent never stops the guests.
    assert_eq!(setting(&agent_unit, "KillMode"), ["process"]);
    assert_eq!(setting(&agent_unit, "ReadWritePaths"), ["/var/lib/betang"]);
    println!(
        "{}",
        serde_json::json!({
            "controller_exposure": controller,
            "agent_exposure": agent,
        })
    );
    Ok(())
}
