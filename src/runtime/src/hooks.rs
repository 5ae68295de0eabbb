//! OCI hooks. They run on the host, in the runtime's namespaces (a host
//! binary cannot run inside the container's VM), with the container's state
//! on stdin, at the points the runtime-spec names:
//!
//! | hook | when | if it fails |
//! |---|---|---|
//! | prestart, createRuntime, createContainer | `create`, once the container is prepared in its VM | create fails, the container is taken down |
//! | startContainer | `start`, before the process is exec'd | start fails, the container is stopped |
//! | poststart | `start`, once the process runs | a warning |
//! | poststop | `delete` | a warning |

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks, Spec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl Kind {
    /// Every kind, in the order the runtime-spec runs them.
    pub const ALL: [Kind; 6] = [
        Kind::Prestart,
        Kind::CreateRuntime,
        Kind::CreateContainer,
        Kind::StartContainer,
        Kind::Poststart,
        Kind::Poststop,
    ];

    /// The kind's name in config.json (and in `features`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Prestart => "prestart",
            Kind::CreateRuntime => "createRuntime",
            Kind::CreateContainer => "createContainer",
            Kind::StartContainer => "startContainer",
            Kind::Poststart => "poststart",
            Kind::Poststop => "poststop",
        }
    }

    fn of(self, hooks: &Hooks) -> Vec<Hook> {
        #[allow(deprecated)]
        let list = match self {
            Kind::Prestart => hooks.prestart(),
            Kind::CreateRuntime => hooks.create_runtime(),
            Kind::CreateContainer => hooks.create_container(),
            Kind::StartContainer => hooks.start_container(),
            Kind::Poststart => hooks.poststart(),
            Kind::Poststop => hooks.poststop(),
        };
        list.clone().unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hooks.{kind}[{index}] ({path}): cannot run it")]
    Spawn {
        kind: &'static str,
        index: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hooks.{kind}[{index}] ({path}) failed with {status}{stderr}")]
    Failed {
        kind: &'static str,
        index: usize,
        path: String,
        status: String,
        stderr: String,
    },
    #[error("hooks.{kind}[{index}] ({path}) did not finish within its timeout of {secs} s")]
    Timeout {
        kind: &'static str,
        index: usize,
        path: String,
        secs: i64,
    },
}

/// The hooks of `spec` whose path is not absolute, which the runtime-spec
/// forbids ("path MUST be absolute"), as (field, path): refused when the
/// container is planned, before anything runs, rather than run relative to
/// whatever directory the runtime happens to be in.
pub fn relative_paths(spec: &Spec) -> Vec<(String, String)> {
    let Some(hooks) = spec.hooks() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for (index, hook) in kind.of(hooks).iter().enumerate() {
            if !hook.path().is_absolute() {
                out.push((
                    format!("hooks.{}[{index}].path", kind.name()),
                    hook.path().display().to_string(),
                ));
            }
        }
    }
    out
}

/// Runs the `kind` hooks of `spec` in order, each with `state` on stdin;
/// stops at the first that fails.
pub fn run(kind: Kind, spec: &Spec, state: &serde_json::Value) -> Result<(), HookError> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    let input = serde_json::to_vec(state).expect("state serializes");
    for (index, hook) in kind.of(hooks).iter().enumerate() {
        run_one(kind.name(), index, hook, &input)?;
    }
    Ok(())
}

/// Runs the `kind` hooks, logging failures instead of failing.
pub fn run_warn(kind: Kind, spec: &Spec, state: &serde_json::Value) {
    if let Err(e) = run(kind, spec, state) {
        tracing::warn!("{e}");
    }
}

fn run_one(kind: &'static str, index: usize, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    let args = hook.args().clone().unwrap_or_default();
    if let Some(arg0) = args.first() {
        use std::os::unix::process::CommandExt;
        cmd.arg0(arg0);
    }
    cmd.args(args.iter().skip(1))
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for e in hook.env().iter().flatten() {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        kind,
        index,
        path: path.clone(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(input);
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| (t, Instant::now() + Duration::from_secs(t as u64)));
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(source) => {
                return Err(HookError::Spawn {
                    kind,
                    index,
                    path,
                    source,
                })
            }
        }
        if let Some((secs, d)) = deadline {
            if Instant::now() > d {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::Timeout {
                    kind,
                    index,
                    path,
                    secs,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let stderr = stderr.trim();
    let stderr = if stderr.is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.lines().last().unwrap_or_default())
    };
    Err(HookError::Failed {
        kind,
        index,
        path,
        status: status.to_string(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "hooks": hooks})).unwrap()
    }

    #[test]
    fn hooks_get_the_state_args_and_env_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // argv[0] from /proc (the hook's own name for itself), $1, $FOO.
        let script = format!("cat >> {0}; a0=$(tr '\\0' '\\n' < /proc/$$/cmdline | head -n 1); echo \" $a0 $1 $FOO\" >> {0}", out.display());
        let s = spec(serde_json::json!({"createRuntime": [
            {"path": "/bin/sh", "args": ["first", "-c", script.clone(), "zero", "a1"], "env": ["FOO=one", "PATH=/bin:/usr/bin"]},
            {"path": "/bin/sh", "args": ["second", "-c", script, "zero", "a2"], "env": ["FOO=two", "PATH=/bin:/usr/bin"]}
        ]}));
        run(Kind::CreateRuntime, &s, &serde_json::json!({"id": "c1"})).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            text,
            "{\"id\":\"c1\"} first a1 one\n{\"id\":\"c1\"} second a2 two\n"
        );
    }

    #[test]
    fn a_failing_hook_stops_the_rest_and_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let s = spec(serde_json::json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo boom >&2; exit 3"]},
            {"path": "/bin/touch", "args": ["touch", marker.to_str().unwrap()]}
        ]}));
        let e = run(Kind::StartContainer, &s, &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("hooks.startContainer[0] (/bin/sh) failed with exit status: 3: boom"),
            "{e}"
        );
        assert!(!marker.exists());
    }

    #[test]
    fn relative_hook_paths_are_found_in_every_kind() {
        let s = spec(serde_json::json!({
            "prestart": [{"path": "/bin/true"}, {"path": "bin/false"}],
            "startContainer": [{"path": "false"}],
            "poststop": [{"path": "/bin/true"}]
        }));
        assert_eq!(
            relative_paths(&s),
            vec![
                (
                    "hooks.prestart[1].path".to_string(),
                    "bin/false".to_string()
                ),
                (
                    "hooks.startContainer[0].path".to_string(),
                    "false".to_string()
                )
            ]
        );
        assert!(relative_paths(&spec(serde_json::json!({}))).is_empty());
    }

    #[test]
    fn timeouts_and_missing_binaries_are_errors() {
        let s = spec(
            serde_json::json!({"poststart": [{"path": "/bin/sleep", "args": ["sleep", "10"], "timeout": 1}]}),
        );
        let t = Instant::now();
        assert!(matches!(
            run(Kind::Poststart, &s, &serde_json::json!({})),
            Err(HookError::Timeout { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
        let s = spec(serde_json::json!({"poststop": [{"path": "/no/such/hook"}]}));
        assert!(matches!(
            run(Kind::Poststop, &s, &serde_json::json!({})),
            Err(HookError::Spawn { .. })
        ));
    }
}
