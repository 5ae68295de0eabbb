//! Logging as runc does it: `--log FILE` (default stderr), `--log-format
//! text|json` with runc's JSON line shape `{"level","msg","time"}`, and
//! `--debug`.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    pub fn parse(s: Option<&str>) -> Result<Format, String> {
        match s {
            None | Some("text") => Ok(Format::Text),
            Some("json") => Ok(Format::Json),
            Some(other) => Err(format!(
                "--log-format: unknown format {other:?} (want text or json)"
            )),
        }
    }
}

/// Where log lines go and in which shape.
pub struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    format: Format,
    max: Level,
    to_stderr: bool,
}

impl Logger {
    /// True when log lines already go to stderr (so an error need not be
    /// printed twice).
    pub fn logs_to_stderr(&self) -> bool {
        self.to_stderr
    }

    fn line(&self, level: &Level, msg: &str, fields: &[(String, String)]) -> String {
        let level = level.as_str().to_ascii_lowercase();
        let time = rfc3339_now();
        match self.format {
            Format::Json => {
                let mut m = serde_json::Map::new();
                m.insert("level".into(), level.into());
                m.insert("msg".into(), msg.into());
                m.insert("time".into(), time.into());
                for (k, v) in fields {
                    m.insert(k.clone(), v.clone().into());
                }
                serde_json::Value::Object(m).to_string()
            }
            Format::Text => {
                let mut s = format!("time=\"{time}\" level={level} msg={msg:?}");
                for (k, v) in fields {
                    s.push_str(&format!(" {k}={v:?}"));
                }
                s
            }
        }
    }

    /// Writes one record directly (used for the final error).
    pub fn write(&self, level: Level, msg: &str) {
        let line = self.line(&level, msg, &[]);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Opens the log and installs it as the global tracing subscriber.
pub fn init(log: Option<&Path>, format: Format, debug: bool) -> std::io::Result<&'static Logger> {
    let (out, to_stderr): (Box<dyn Write + Send>, bool) = match log {
        Some(p) if p != Path::new("/dev/stderr") => (
            Box::new(OpenOptions::new().create(true).append(true).open(p)?),
            false,
        ),
        _ => (Box::new(std::io::stderr()), true),
    };
    let max = if debug { Level::DEBUG } else { Level::INFO };
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        out: Mutex::new(out),
        format,
        max,
        to_stderr,
    }));
    let subscriber = tracing_subscriber::registry().with(LogLayer(logger));
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(logger)
}

struct LogLayer(&'static Logger);

#[derive(Default)]
struct Fields {
    msg: String,
    rest: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_string();
        } else {
            self.rest
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.msg = format!("{value:?}");
        } else {
            self.rest
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

/// The target of warnings that go to a log file (or with `--debug`), but
/// not to a plain stderr: there stderr is the workload's own (`run` in the
/// foreground), relayed byte for byte.
pub const FILE_ONLY: &str = "krun_oci::file_only";

impl<S: Subscriber> Layer<S> for LogLayer {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        let quiet = metadata.target() == FILE_ONLY && self.0.to_stderr && self.0.max < Level::DEBUG;
        *metadata.level() <= self.0.max && metadata.target().starts_with("krun") && !quiet
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let line = self.0.line(event.metadata().level(), &f.msg, &f.rest);
        let mut out = self.0.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{line}");
    }
}

/// The current UTC time as RFC 3339 with nanoseconds, as Go's logrus prints it.
pub fn rfc3339_now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_have_runc_shape() {
        let l = Logger {
            out: Mutex::new(Box::new(std::io::sink())),
            format: Format::Json,
            max: Level::INFO,
            to_stderr: false,
        };
        let v: serde_json::Value =
            serde_json::from_str(&l.line(&Level::ERROR, "boom", &[])).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "boom");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn time_is_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), "2026-11-22T07:05:05.123456789Z".len(), "{t}");
        assert!(t.starts_with("20"));
    }
}
