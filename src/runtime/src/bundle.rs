//! Loading a bundle's config.json.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Why a bundle could not be loaded. Each message names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {0}: no such directory")]
    NoBundle(PathBuf),
    #[error("{path}: cannot read")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line} column {column}: {msg}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("{path}: field {field}: {msg}")]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },
}

/// A bundle: its directory (absolute) and its parsed config.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    /// config.json as it was read: `create` keeps it in the state
    /// directory, and the commands after it use that copy, never the
    /// bundle's file again.
    pub raw: Vec<u8>,
}

impl Bundle {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !dir.is_dir() {
            return Err(BundleError::NoBundle(dir));
        }
        let path = dir.join("config.json");
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let spec = parse_spec(&path, &bytes)?;
        Ok(Bundle {
            dir,
            spec,
            raw: bytes,
        })
    }
}

/// Parses config.json bytes, naming the field that is wrong when the JSON is
/// well-formed but does not fit the runtime-spec.
pub fn parse_spec(path: &Path, bytes: &[u8]) -> Result<Spec, BundleError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, Spec>(de) {
        Ok(spec) => Ok(spec),
        Err(e) => {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() || field == "." {
                let msg = inner.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                Err(BundleError::Syntax {
                    path: path.to_path_buf(),
                    line: inner.line(),
                    column: inner.column(),
                    msg,
                })
            } else {
                let msg = inner.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                Err(BundleError::Field {
                    path: path.to_path_buf(),
                    field,
                    msg,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_give_a_position() {
        let e = parse_spec(Path::new("config.json"), b"{\"ociVersion\": ").unwrap_err();
        assert!(matches!(e, BundleError::Syntax { line: 1, .. }), "{e}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = parse_spec(
            Path::new("config.json"),
            br#"{"ociVersion":"1.0.2","process":{"args":"sh","cwd":"/","user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("process.args"), "{msg}");
    }

    #[test]
    fn missing_config_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Bundle::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }
}
