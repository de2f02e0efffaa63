//! Fitting into people's SSH setup: ssh_config aliases (read with OpenSSH's
//! own `ssh -G`), ProxyJump, and the generated Host block for the endpoint.

mod support;

use std::process::Command;
use std::time::Duration;
use support::*;

/// Writes an ssh_config for the tests: alias `prod` for `sshd_port`, a
/// wildcard block supplying the key, and an Include.
fn write_ssh_config(
    env: &TestEnv,
    sshd_port: u16,
    kh: &std::path::Path,
    extra: &str,
) -> std::path::PathBuf {
    let inc = env.path("ssh_config_included");
    std::fs::write(
        &inc,
        format!(
            "Host *.lab pro? 127.0.0.1\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n",
            env.user_key().display(),
            kh.display()
        ),
    )
    .unwrap();
    let cfg = env.path("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host prod\n  HostName 127.0.0.1\n  Port {sshd_port}\n  User {}\n{extra}\nHost *\nInclude {}\n",
            env.user(),
            inc.display()
        ),
    )
    .unwrap();
    cfg
}

/// A shim started as `sshshim up ARGS` with only the endpoint flags added.
fn shim_up(env: &TestEnv, args: &[&str]) -> ShimBuilder {
    let mut all = vec!["up", "--listen", "127.0.0.1:0", "--authorized-keys"];
    let ak = env.authorized_keys().display().to_string();
    let hk = env.shim_host_key().display().to_string();
    all.push(&ak);
    all.push("--host-key");
    all.push(&hk);
    all.extend_from_slice(args);
    env.shim_builder(0).no_default_args().args(&all)
}

#[test]
fn alias_resolved_through_ssh_config() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let cfg = write_ssh_config(&env, sshd.port(), &env.known_hosts(), "");
    let shim = shim_up(&env, &["-F", cfg.to_str().unwrap(), "prod"]).start();
    let out = run(&mut shim.ssh(&["echo via-alias"]));
    assert_eq!(stdout_text(&out), "via-alias\n");
    assert!(
        shim.stdout_text()
            .contains(&format!("127.0.0.1:{}", sshd.port())),
        "{}",
        shim.stdout_text()
    );
}

#[test]
fn strict_host_key_checking_accept_new_from_ssh_config() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let kh = env.path("fresh_known_hosts");
    let cfg = write_ssh_config(
        &env,
        sshd.port(),
        &kh,
        "  StrictHostKeyChecking accept-new\n",
    );
    let shim = shim_up(&env, &["-F", cfg.to_str().unwrap(), "prod"]).start();
    assert_eq!(stdout_text(&run(&mut shim.ssh(&["echo ok"]))), "ok\n");
    let recorded = std::fs::read_to_string(&kh).unwrap();
    assert!(
        recorded.contains(&format!("[127.0.0.1]:{}", sshd.port())),
        "{recorded}"
    );
}

#[test]
fn two_hop_proxy_jump_checks_each_host_key() {
    let env = TestEnv::new();
    let jump = Sshd::start(&env);
    let target = Sshd::start(&env);
    let kh = env.path("kh_both");
    let line = env.host_key_line();
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {line}\n[127.0.0.1]:{} {line}\n",
            jump.port(),
            target.port()
        ),
    )
    .unwrap();
    let cfg = write_ssh_config(&env, target.port(), &kh, "");
    let jump_spec = format!("{}@127.0.0.1:{}", env.user(), jump.port());
    let dest = format!("{}@127.0.0.1:{}", env.user(), target.port());
    let shim = shim_up(
        &env,
        &["-F", cfg.to_str().unwrap(), "-J", &jump_spec, &dest],
    )
    .start();
    let out = run(&mut shim.ssh(&["echo two-hops"]));
    assert_eq!(stdout_text(&out), "two-hops\n");
    assert!(
        shim.stdout_text().contains(" via "),
        "{}",
        shim.stdout_text()
    );
    drop(shim);

    // Without the jump host's key the chain is refused at that hop.
    std::fs::write(&kh, format!("[127.0.0.1]:{} {line}\n", target.port())).unwrap();
    let (code, _o, err) = shim_up(
        &env,
        &["-F", cfg.to_str().unwrap(), "-J", &jump_spec, &dest],
    )
    .run_expect_exit(Duration::from_secs(20));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("[127.0.0.1]:{} is not known", jump.port())),
        "{err}"
    );
}

#[test]
fn generated_host_block_works_without_prompts() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let cfg = write_ssh_config(&env, sshd.port(), &env.known_hosts(), "");
    let shim = shim_up(&env, &["-F", cfg.to_str().unwrap(), "prod"]).start();
    let home = env.path("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let user_config = home.join(".ssh/config");
    std::fs::write(&user_config, "Host foo\n  User bar\n").unwrap();
    let install = || {
        let out = run(Command::new(env!("CARGO_BIN_EXE_sshshim"))
            .args([
                "ssh-config",
                "prod",
                "--install",
                "--port",
                &shim.port().to_string(),
                "-i",
            ])
            .arg(env.user_key())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_STATE_HOME", env.state_dir()));
        assert_success(&out, "ssh-config --install");
    };
    install();
    install();
    let text = std::fs::read_to_string(&user_config).unwrap();
    assert_eq!(text.matches("Include").count(), 1, "{text}");
    assert!(text.ends_with("Host foo\n  User bar\n"), "{text}");
    let block = home.join(".ssh/config.d/sshshim");
    let block_text = std::fs::read_to_string(&block).unwrap();
    assert!(
        block_text.contains("Host prod-shim") && block_text.contains("HostKeyAlias sshshim-prod"),
        "{block_text}"
    );

    // ssh, scp, sftp and rsync with the generated block and no prompt.
    let ssh_base = format!("ssh -F {} -o BatchMode=yes", block.display());
    let out = run(Command::new("ssh")
        .args([
            "-F",
            block.to_str().unwrap(),
            "-o",
            "BatchMode=yes",
            "prod-shim",
            "echo short-form",
        ])
        .env_remove("SSH_AUTH_SOCK"));
    assert_success(&out, "ssh prod-shim");
    assert_eq!(stdout_text(&out), "short-form\n");
    let src = env.path("f.bin");
    std::fs::write(&src, pseudo_random_bytes(100_000, 3)).unwrap();
    let dst = env.path("f-copy.bin");
    let out = run(Command::new("scp")
        .args(["-F", block.to_str().unwrap(), "-o", "BatchMode=yes"])
        .arg(&src)
        .arg(format!("prod-shim:{}", dst.display()))
        .env_remove("SSH_AUTH_SOCK"));
    assert_success(&out, "scp to prod-shim");
    assert_eq!(sha256_file(&dst), sha256_file(&src));
    let batch = env.path("batch");
    std::fs::write(&batch, format!("ls {}\n", dst.display())).unwrap();
    let out = run(Command::new("sftp")
        .args([
            "-F",
            block.to_str().unwrap(),
            "-o",
            "BatchMode=yes",
            "-b",
            batch.to_str().unwrap(),
            "prod-shim",
        ])
        .env_remove("SSH_AUTH_SOCK"));
    assert_success(&out, "sftp prod-shim");
    let dst2 = env.path("f-rsync.bin");
    let out = run(Command::new("rsync")
        .args(["-e", &ssh_base])
        .arg(&src)
        .arg(format!("prod-shim:{}", dst2.display()))
        .env_remove("SSH_AUTH_SOCK"));
    assert_success(&out, "rsync -e ssh prod-shim");
    assert_eq!(sha256_file(&dst2), sha256_file(&src));
}
