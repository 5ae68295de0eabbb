//! `--systemd-cgroup`: the container's cgroup as a transient systemd unit,
//! asked of systemd over D-Bus as runc's systemd driver asks for it, so
//! that systemd knows the cgroup is taken (it neither moves its processes
//! nor resets its limits on a reload) and `systemctl status` shows it.
//!
//! A scope (`prefix-name.scope`) is started with `StartTransientUnit`:
//! in its slice, delegated, holding the process given (the runtime's
//! own, whose children the monitor and VMM are; the shim's), with the
//! accounting switched on and the limits as unit properties (runc's
//! names: `MemoryMax`/`MemoryLimit`, `CPUWeight`/`CPUShares`,
//! `CPUQuotaPerSecUSec`, `TasksMax`, `AllowedCPUs`...). The call returns
//! a job; the unit is there when the job's `JobRemoved` signal says
//! `done`, 30 s at most. A name that ends in `.slice` is a transient slice
//! instead, wanted by its parent, holding no process. `update` sets the
//! same properties on the unit (`SetUnitProperties`), and removal stops
//! it (`StopUnit`, then `ResetFailedUnit`; a unit already gone is fine).
//! The cgroupfs side then works as for any cgroup (see the parent module):
//! the same limits written to the files, the hierarchies systemd does not
//! manage (cgroup v1's cpuset, say) made by hand.
//!
//! As root the private socket `/run/systemd/private` is used (no bus daemon
//! needed); otherwise the system bus, with the signal subscribed to.

use std::path::Path;
use std::time::{Duration, Instant};

use super::dbus::{Call, Connection, DbusError, Message, Value};
use super::HostResources;
use crate::plan::shares_to_weight;

const PRIVATE_SOCKET: &str = "/run/systemd/private";
const SYSTEM_BUS: &str = "/run/dbus/system_bus_socket";
/// How long a call or a job may take (runc waits 30 s for its job).
const TIMEOUT: Duration = Duration::from_secs(30);
const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// Why systemd did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(transparent)]
    Dbus(#[from] DbusError),
    #[error("its job ended {0:?}, not \"done\" (see `journalctl -u` of the unit)")]
    Job(String),
}

/// A connection to systemd's manager.
pub struct Systemd {
    conn: Connection,
    /// Through the system bus, where calls name their destination.
    bus: bool,
}

impl Systemd {
    /// Connects: as root to systemd's private socket, else to the system
    /// bus.
    pub fn connect() -> Result<Systemd, SystemdError> {
        // SAFETY: geteuid has no failure modes and no memory effects.
        if unsafe { libc::geteuid() } == 0 && Path::new(PRIVATE_SOCKET).exists() {
            return Systemd::connect_at(Path::new(PRIVATE_SOCKET), false);
        }
        Systemd::connect_at(Path::new(SYSTEM_BUS), true)
    }

    /// Connects to systemd's socket at `path`, or (`bus`) to a bus there.
    pub fn connect_at(path: &Path, bus: bool) -> Result<Systemd, SystemdError> {
        let deadline = Instant::now() + TIMEOUT;
        let conn = Connection::open(path, bus, deadline)?;
        let mut sd = Systemd { conn, bus };
        if !bus {
            return Ok(sd);
        }
        // On the bus, JobRemoved reaches only a subscriber that matches it.
        let rule = format!(
            "type='signal',sender='{SYSTEMD}',path='{MANAGER_PATH}',interface='{MANAGER}',member='JobRemoved'"
        );
        sd.conn.call(
            &Call {
                destination: Some("org.freedesktop.DBus"),
                path: "/org/freedesktop/DBus",
                interface: "org.freedesktop.DBus",
                member: "AddMatch",
                args: vec![Value::Str(rule)],
            },
            deadline,
        )?;
        sd.manager("Subscribe", vec![], deadline)?;
        Ok(sd)
    }

    fn manager(
        &mut self,
        member: &str,
        args: Vec<Value>,
        deadline: Instant,
    ) -> Result<Vec<Value>, DbusError> {
        let call = Call {
            destination: self.bus.then_some(SYSTEMD),
            path: MANAGER_PATH,
            interface: MANAGER,
            member,
            args,
        };
        self.conn.call(&call, deadline)
    }

    /// Calls `member`, which queues a job, and waits for the job's end.
    fn job(&mut self, member: &str, args: Vec<Value>) -> Result<(), SystemdError> {
        let deadline = Instant::now() + TIMEOUT;
        let body = self.manager(member, args, deadline)?;
        let Some(job) = body.first().and_then(Value::as_str).map(str::to_string) else {
            return Err(DbusError::Malformed("a job call answered without a job").into());
        };
        let ended = self
            .conn
            .wait_signal(|m| job_removed(m).is_some_and(|(j, _)| j == job), deadline)?;
        match job_removed(&ended) {
            Some((_, "done")) => Ok(()),
            Some((_, result)) => Err(SystemdError::Job(result.to_string())),
            None => unreachable!("the signal waited for is a JobRemoved"),
        }
    }

    /// Starts the transient unit `unit` in `slice` holding `pid` (a scope;
    /// a slice holds none), with `resources`; `v2`: on cgroup v2, whose
    /// property names differ. A unit of that name that failed before is
    /// reset and started again.
    pub fn start(
        &mut self,
        unit: &str,
        slice: &str,
        pid: u32,
        resources: &HostResources,
        v2: bool,
    ) -> Result<(), SystemdError> {
        let props = start_properties(unit, slice, pid, resources, v2);
        let args = |props: &Vec<Value>| {
            vec![
                Value::Str(unit.into()),
                Value::Str("replace".into()),
                Value::Array("(sv)".into(), props.clone()),
                Value::Array("(sa(sv))".into(), vec![]),
            ]
        };
        match self.job("StartTransientUnit", args(&props)) {
            Err(SystemdError::Dbus(e))
                if e.remote_name() == Some("org.freedesktop.systemd1.UnitExists") =>
            {
                self.reset_failed(unit);
                self.job("StartTransientUnit", args(&props))
            }
            other => other,
        }
    }

    /// Sets `resources` on `unit` (for `update`), at runtime only.
    pub fn set(
        &mut self,
        unit: &str,
        resources: &HostResources,
        v2: bool,
    ) -> Result<(), SystemdError> {
        let props = resource_properties(resources, v2);
        if props.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + TIMEOUT;
        self.manager(
            "SetUnitProperties",
            vec![
                Value::Str(unit.into()),
                Value::Bool(true),
                Value::Array("(sv)".into(), props),
            ],
            deadline,
        )?;
        Ok(())
    }

    /// Stops `unit` (its processes, if any are left, are killed) and
    /// forgets a failure of it; a unit already gone is fine.
    pub fn stop(&mut self, unit: &str) -> Result<(), SystemdError> {
        let r = self.job(
            "StopUnit",
            vec![Value::Str(unit.into()), Value::Str("replace".into())],
        );
        self.reset_failed(unit);
        match r {
            Err(SystemdError::Dbus(e))
                if e.remote_name() == Some("org.freedesktop.systemd1.NoSuchUnit") =>
            {
                Ok(())
            }
            other => other,
        }
    }

    fn reset_failed(&mut self, unit: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let _ = self.manager("ResetFailedUnit", vec![Value::Str(unit.into())], deadline);
    }
}

/// A `JobRemoved(u id, o job, s unit, s result)` signal's job and result.
fn job_removed(m: &Message) -> Option<(&str, &str)> {
    if m.interface.as_deref() != Some(MANAGER) || m.member.as_deref() != Some("JobRemoved") {
        return None;
    }
    match &m.body[..] {
        [Value::U32(_), Value::ObjectPath(job), Value::Str(_), Value::Str(result)] => {
            Some((job, result))
        }
        _ => None,
    }
}

fn prop(name: &str, v: Value) -> Value {
    Value::Struct(vec![Value::Str(name.into()), Value::Variant(Box::new(v))])
}

/// `StartTransientUnit`'s properties for `unit`, as runc's driver sets
/// them.
pub fn start_properties(
    unit: &str,
    slice: &str,
    pid: u32,
    resources: &HostResources,
    v2: bool,
) -> Vec<Value> {
    let mut props = vec![prop(
        "Description",
        Value::Str(format!("krun-oci container {unit}")),
    )];
    if unit.ends_with(".slice") {
        // A slice's parent is a dependency; it holds no process.
        props.push(prop(
            "Wants",
            Value::Array("s".into(), vec![Value::Str(slice.into())]),
        ));
    } else {
        props.push(prop("Slice", Value::Str(slice.into())));
        props.push(prop("Delegate", Value::Bool(true)));
        props.push(prop(
            "PIDs",
            Value::Array("u".into(), vec![Value::U32(pid)]),
        ));
    }
    props.push(prop("MemoryAccounting", Value::Bool(true)));
    props.push(prop("CPUAccounting", Value::Bool(true)));
    props.push(prop("TasksAccounting", Value::Bool(true)));
    if v2 {
        props.push(prop("IOAccounting", Value::Bool(true)));
    }
    props.push(prop("DefaultDependencies", Value::Bool(false)));
    props.extend(resource_properties(resources, v2));
    props
}

/// The unit properties of `resources` (runc's, by cgroup version).
pub fn resource_properties(r: &HostResources, v2: bool) -> Vec<Value> {
    let mut props = Vec::new();
    if let Some(bytes) = r.memory_limit {
        let name = if v2 { "MemoryMax" } else { "MemoryLimit" };
        props.push(prop(name, Value::U64(bytes)));
    }
    if let Some(shares) = r.cpu_shares {
        props.push(match v2 {
            true => prop("CPUWeight", Value::U64(shares_to_weight(shares))),
            false => prop("CPUShares", Value::U64(shares)),
        });
    }
    if r.cpu_quota.is_some() || r.cpu_period.is_some() {
        let period = r.cpu_period.filter(|p| *p > 0).unwrap_or(100_000);
        props.push(prop("CPUQuotaPeriodUSec", Value::U64(period)));
        props.push(prop(
            "CPUQuotaPerSecUSec",
            Value::U64(quota_per_sec(r.cpu_quota, period)),
        ));
    }
    if let Some(max) = r.pids_max {
        let max = u64::try_from(max)
            .ok()
            .filter(|m| *m > 0)
            .unwrap_or(u64::MAX);
        props.push(prop("TasksMax", Value::U64(max)));
    }
    if v2 {
        for (name, list) in [
            ("AllowedCPUs", &r.cpuset_cpus),
            ("AllowedMemoryNodes", &r.cpuset_mems),
        ] {
            if let Some(mask) = list.as_deref().and_then(cpu_mask) {
                props.push(prop(name, mask));
            }
        }
    }
    props
}

/// systemd's CPU quota: microseconds of CPU per second, rounded up to a
/// whole percent as runc rounds it (systemd keeps only that much); no
/// quota (none, zero or negative) is infinity.
pub fn quota_per_sec(quota: Option<i64>, period: u64) -> u64 {
    match quota {
        Some(q) if q > 0 => {
            let per_sec = (q as u64).saturating_mul(1_000_000) / period.max(1);
            per_sec.div_ceil(10_000).saturating_mul(10_000)
        }
        _ => u64::MAX,
    }
}

/// A cpuset list (`0-3,8`) as systemd's bitmask (`ay`: bit n of byte n/8
/// is CPU n); `None` when it is not a list this takes (the cgroupfs write
/// then reports it), or names a CPU past 8191.
pub fn cpu_mask(list: &str) -> Option<Value> {
    let mut bytes: Vec<u8> = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        if lo > hi || hi >= 8192 {
            return None;
        }
        if bytes.len() <= hi / 8 {
            bytes.resize(hi / 8 + 1, 0);
        }
        for n in lo..=hi {
            bytes[n / 8] |= 1 << (n % 8);
        }
    }
    Some(Value::Array(
        "y".into(),
        bytes.into_iter().map(Value::Byte).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroups::dbus::{encode, message_len, ERROR, METHOD_RETURN, SIGNAL};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;

    /// Plays systemd's private socket for one connection: answers each
    /// call with `answer(call, job path)` (an error name, or None for a
    /// job path and, for job calls, `JobRemoved` with `result(call)`);
    /// returns the calls it got, in order.
    fn fake_systemd(
        answer: impl Fn(&Message) -> Option<&'static str> + Send + 'static,
        result: &'static str,
    ) -> (tempfile::TempDir, std::thread::JoinHandle<Vec<Message>>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("private")).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).unwrap();
            assert!(line.starts_with(b"\0AUTH EXTERNAL "), "{line:?}");
            out.write_all(b"OK 0123456789abcdef0123456789abcdef\r\n")
                .unwrap();
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            assert_eq!(line, b"BEGIN\r\n");
            let mut calls = Vec::new();
            let mut serial = 100;
            loop {
                let mut head = [0u8; 16];
                if r.read_exact(&mut head).is_err() {
                    return calls;
                }
                let mut buf = vec![0; message_len(&head).unwrap()];
                buf[..16].copy_from_slice(&head);
                r.read_exact(&mut buf[16..]).unwrap();
                let call = Message::parse(&buf).unwrap();
                serial += 1;
                let reply = |kind, fields: Vec<(u8, Value)>, body: &[Value]| {
                    let mut f = vec![(5, Value::U32(call.serial))];
                    f.extend(fields);
                    encode(kind, serial, f, body)
                };
                let job = format!("/org/freedesktop/systemd1/job/{serial}");
                let member = call.member.clone().unwrap_or_default();
                let bytes = match answer(&call) {
                    Some(error) => reply(
                        ERROR,
                        vec![(4, Value::Str(error.into()))],
                        &[Value::Str(format!("{member} refused"))],
                    ),
                    None if member.ends_with("Unit") && member != "ResetFailedUnit" => {
                        let mut b = reply(METHOD_RETURN, vec![], &[Value::ObjectPath(job.clone())]);
                        // Another job's end first, which must be passed over.
                        for (path, res) in [(format!("{job}0"), "failed"), (job, result)] {
                            b.extend(encode(
                                SIGNAL,
                                serial,
                                vec![
                                    (1, Value::ObjectPath(MANAGER_PATH.into())),
                                    (2, Value::Str(MANAGER.into())),
                                    (3, Value::Str("JobRemoved".into())),
                                ],
                                &[
                                    Value::U32(serial),
                                    Value::ObjectPath(path),
                                    Value::Str("x.scope".into()),
                                    Value::Str(res.into()),
                                ],
                            ));
                        }
                        b
                    }
                    None => reply(METHOD_RETURN, vec![], &[]),
                };
                out.write_all(&bytes).unwrap();
                calls.push(call);
            }
        });
        (dir, server)
    }

    fn members(calls: &[Message]) -> Vec<&str> {
        calls.iter().filter_map(|c| c.member.as_deref()).collect()
    }

    fn property<'a>(call: &'a Message, name: &str) -> Option<&'a Value> {
        let Some(Value::Array(_, props)) = call.body.get(2) else {
            return None;
        };
        props.iter().find_map(|p| match p {
            Value::Struct(f) if f[0] == Value::Str(name.into()) => match &f[1] {
                Value::Variant(v) => Some(&**v),
                _ => None,
            },
            _ => None,
        })
    }

    fn limits() -> HostResources {
        HostResources {
            memory_limit: Some(512 << 20),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            pids_max: Some(-1),
            cpuset_cpus: Some("0-1,9".into()),
            ..HostResources::default()
        }
    }

    #[test]
    fn a_scope_is_asked_for_with_runcs_properties_and_waited_for() {
        let (dir, server) = fake_systemd(|_| None, "done");
        let mut sd = Systemd::connect_at(&dir.path().join("private"), false).unwrap();
        sd.start("krun-oci-c1.scope", "machine.slice", 42, &limits(), true)
            .unwrap();
        drop(sd);
        let calls = server.join().unwrap();
        assert_eq!(members(&calls), ["Ping", "StartTransientUnit"]);
        let start = &calls[1];
        assert_eq!(start.signature, "ssa(sv)a(sa(sv))");
        assert_eq!(start.body[0], Value::Str("krun-oci-c1.scope".into()));
        assert_eq!(start.body[1], Value::Str("replace".into()));
        let p = |name| property(start, name).cloned();
        assert_eq!(p("Slice"), Some(Value::Str("machine.slice".into())));
        assert_eq!(p("Delegate"), Some(Value::Bool(true)));
        assert_eq!(p("DefaultDependencies"), Some(Value::Bool(false)));
        assert_eq!(
            p("PIDs"),
            Some(Value::Array("u".into(), vec![Value::U32(42)]))
        );
        assert_eq!(p("MemoryMax"), Some(Value::U64(512 << 20)));
        assert_eq!(p("MemoryLimit"), None, "v1's name, not on v2");
        assert_eq!(p("CPUQuotaPerSecUSec"), Some(Value::U64(500_000)));
        assert_eq!(p("CPUQuotaPeriodUSec"), Some(Value::U64(100_000)));
        assert_eq!(p("TasksMax"), Some(Value::U64(u64::MAX)));
        assert_eq!(
            p("AllowedCPUs"),
            Some(Value::Array(
                "y".into(),
                vec![Value::Byte(0b11), Value::Byte(0b10)]
            ))
        );
    }

    #[test]
    fn a_job_that_fails_is_an_error_naming_its_result() {
        let (dir, server) = fake_systemd(|_| None, "dependency");
        let mut sd = Systemd::connect_at(&dir.path().join("private"), false).unwrap();
        let e = sd
            .start(
                "a.scope",
                "machine.slice",
                1,
                &HostResources::default(),
                false,
            )
            .unwrap_err();
        assert!(e.to_string().contains("\"dependency\""), "{e}");
        drop(sd);
        server.join().unwrap();
    }

    #[test]
    fn a_unit_that_exists_is_reset_and_started_again_once() {
        let first = std::sync::atomic::AtomicBool::new(true);
        let (dir, server) = fake_systemd(
            move |c| {
                let start = c.member.as_deref() == Some("StartTransientUnit");
                (start && first.swap(false, std::sync::atomic::Ordering::SeqCst))
                    .then_some("org.freedesktop.systemd1.UnitExists")
            },
            "done",
        );
        let mut sd = Systemd::connect_at(&dir.path().join("private"), false).unwrap();
        sd.start(
            "a.scope",
            "machine.slice",
            1,
            &HostResources::default(),
            false,
        )
        .unwrap();
        drop(sd);
        let calls = server.join().unwrap();
        assert_eq!(
            members(&calls),
            [
                "Ping",
                "StartTransientUnit",
                "ResetFailedUnit",
                "StartTransientUnit"
            ]
        );
    }

    #[test]
    fn stopping_a_unit_that_is_gone_is_fine_and_other_errors_are_not() {
        let (dir, server) = fake_systemd(
            |c| {
                (c.member.as_deref() == Some("StopUnit"))
                    .then_some("org.freedesktop.systemd1.NoSuchUnit")
            },
            "done",
        );
        let mut sd = Systemd::connect_at(&dir.path().join("private"), false).unwrap();
        sd.stop("gone.scope").unwrap();
        drop(sd);
        assert_eq!(
            members(&server.join().unwrap()),
            ["Ping", "StopUnit", "ResetFailedUnit"]
        );
        let (dir, server) = fake_systemd(
            |c| {
                (c.member.as_deref() == Some("StopUnit"))
                    .then_some("org.freedesktop.DBus.Error.AccessDenied")
            },
            "done",
        );
        let mut sd = Systemd::connect_at(&dir.path().join("private"), false).unwrap();
        let e = sd.stop("x.scope").unwrap_err();
        assert!(e.to_string().contains("AccessDenied"), "{e}");
        drop(sd);
        server.join().unwrap();
    }

    #[test]
    fn v1_properties_use_v1_names_and_a_slice_holds_no_process() {
        let props = start_properties("k-a.slice", "k.slice", 9, &limits(), false);
        let names: Vec<String> = props
            .iter()
            .filter_map(|p| match p {
                Value::Struct(f) => f[0].as_str().map(str::to_string),
                _ => None,
            })
            .collect();
        assert!(names.contains(&"Wants".to_string()), "{names:?}");
        assert!(names.contains(&"MemoryLimit".to_string()), "{names:?}");
        for absent in ["PIDs", "Slice", "Delegate", "MemoryMax", "AllowedCPUs"] {
            assert!(!names.contains(&absent.to_string()), "{absent}: {names:?}");
        }
    }

    #[test]
    fn quotas_round_up_to_a_percent_and_masks_refuse_what_they_cannot_say() {
        assert_eq!(quota_per_sec(Some(50_000), 100_000), 500_000);
        assert_eq!(quota_per_sec(Some(1), 100_000), 10_000);
        assert_eq!(quota_per_sec(Some(-1), 100_000), u64::MAX);
        assert_eq!(quota_per_sec(None, 100_000), u64::MAX);
        // So large it saturates: no limit, as it nearly is.
        assert_eq!(quota_per_sec(Some(i64::MAX), 1), u64::MAX);
        assert_eq!(
            cpu_mask("3"),
            Some(Value::Array("y".into(), vec![Value::Byte(0b1000)]))
        );
        for bad in ["3-1", "x", "0-8192", "1-"] {
            assert_eq!(cpu_mask(bad), None, "{bad}");
        }
    }
}
