//! What the shim answers over ttrpc besides the Task API's own messages:
//! errors with a proper code (never a blanket `Others`, so containerd can
//! tell a missing task from a failed one) and the time of an event.
//!
//! Both the service and the tasks use these; neither owns them, so the two
//! do not import each other.

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{Code, Error as TtrpcError};
use krun_oci::error::Error;
use krun_oci::state::StateError;

/// A ttrpc error with a proper code (never a blanket "Others").
pub fn rpc_error(code: Code, msg: impl Into<String>) -> TtrpcError {
    TtrpcError::RpcStatus(containerd_shim::protos::ttrpc::get_status(code, msg.into()))
}

/// The ttrpc code for an error of the runtime library: what the client
/// sent or asked for is at fault, or the host lacks something, or the
/// runtime failed.
pub fn code_of(e: &Error) -> Code {
    match e {
        // A program that cannot run is the client's problem to see.
        Error::Exit {
            code: 126 | 127, ..
        } => Code::FAILED_PRECONDITION,
        Error::Bundle(_) | Error::Plan(_) => Code::INVALID_ARGUMENT,
        Error::Asset(_) | Error::Backend(_) => Code::FAILED_PRECONDITION,
        Error::State(StateError::Exists(_)) => Code::ALREADY_EXISTS,
        _ => Code::INTERNAL,
    }
}

/// A library error as the client reads it: its code and its whole message.
pub fn library_error(e: Error) -> TtrpcError {
    rpc_error(code_of(&e), e.message())
}

/// A process the guest could not create or start, by the status a shell
/// would give it (127 for a missing program).
pub fn process_error(code: i32, message: String) -> TtrpcError {
    library_error(Error::Exit { code, message })
}

/// Now, as containerd's events and exit records carry it.
pub fn timestamp() -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = now.as_secs() as i64;
    t.nanos = now.subsec_nanos() as i32;
    t
}

/// The code and message of a ttrpc error, for tests.
#[cfg(test)]
pub fn status_of(e: &TtrpcError) -> (Code, String) {
    match e {
        TtrpcError::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not an RPC status: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use krun_oci::assets::AssetError;
    use krun_oci::backend::BackendError;
    use krun_oci::bundle::BundleError;

    #[test]
    fn a_program_that_cannot_run_is_a_failed_precondition() {
        for code in [126, 127] {
            let e = process_error(code, "executable file not found in $PATH".into());
            assert_eq!(
                status_of(&e),
                (
                    Code::FAILED_PRECONDITION,
                    "executable file not found in $PATH".to_string()
                )
            );
        }
        let e = process_error(1, "mount failed".into());
        assert_eq!(status_of(&e), (Code::INTERNAL, "mount failed".to_string()));
    }

    #[test]
    fn a_bad_bundle_is_the_clients_and_a_missing_asset_the_hosts() {
        let e: Error = BundleError::NoBundle("/b".into()).into();
        assert_eq!(code_of(&e), Code::INVALID_ARGUMENT);
        let e: Error = AssetError::NoProgram {
            program: "virtiofsd",
            searched: "/x".into(),
        }
        .into();
        assert_eq!(code_of(&e), Code::FAILED_PRECONDITION);
        let e: Error = BackendError::NoKvm("no /dev/kvm".into()).into();
        assert_eq!(code_of(&e), Code::FAILED_PRECONDITION);
    }

    #[test]
    fn state_errors_say_exists_or_internal() {
        let e: Error = StateError::Exists("c1".into()).into();
        assert_eq!(
            status_of(&library_error(e)),
            (
                Code::ALREADY_EXISTS,
                "container \"c1\" already exists".to_string()
            )
        );
        let e: Error = StateError::Io {
            path: "/run/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        }
        .into();
        assert_eq!(code_of(&e), Code::INTERNAL);
    }

    #[test]
    fn the_message_carries_every_cause() {
        let e: Error = BundleError::Read {
            path: "/b/config.json".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        }
        .into();
        assert_eq!(
            status_of(&library_error(e)).1,
            "/b/config.json: cannot read: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_timestamp_is_now() {
        let t = timestamp();
        assert!(t.seconds > 1_600_000_000);
        assert!((0..1_000_000_000).contains(&t.nanos));
    }
}
