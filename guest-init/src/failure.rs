//! How setting a process up fails: a [`Failure`] carries the message and
//! the exit status the host reports, and [`OrFail`] turns any error into
//! one with the step that failed. The container, mounts and process stages
//! all return it, so it lives apart from each of them.

/// Why a process could not be created or started, with the exit status the
/// host reports for it.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// Adds context to an I/O error as a [`Failure`] with status 1.
pub trait OrFail<T> {
    fn or_fail(self, what: impl FnOnce() -> String) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: impl FnOnce() -> String) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(1, format!("{}: {e}", what())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_fail_names_the_step_with_status_1() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        let f = r.or_fail(|| "opening /x".into()).unwrap_err();
        assert_eq!(f.code, 1);
        assert_eq!(
            f.message,
            "opening /x: No such file or directory (os error 2)"
        );
        assert_eq!(Ok::<_, String>(7).or_fail(|| unreachable!()).unwrap(), 7);
    }
}
