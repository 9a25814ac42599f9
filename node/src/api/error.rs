//! The one place a coordinator error becomes an HTTP answer.

use crate::coordinator::CoordError;
use crate::node::ApiError;

impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> ApiError {
        let message = e.to_string();
        let (status, code) = match e {
            CoordError::Unavailable(_) => (503, "unavailable"),
            CoordError::ClockSkew(_) => (503, "clock_skew"),
            CoordError::NotFound => (404, "not_found"),
            CoordError::Exists(_) => (412, "precondition_failed"),
            CoordError::DiskFull(_) => (507, "insufficient_storage"),
            CoordError::LeaderRefused { status: 413, .. } => (413, "payload_too_large"),
            CoordError::LeaderRefused { status, .. } => (status, "bad_request"),
            CoordError::Internal(_) => (500, "internal"),
        };
        ApiError::new(status, code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_coordinator_error_keeps_its_status_code_and_sentence() {
        let cases = [
            (CoordError::Unavailable("u".into()), 503, "unavailable", "u"),
            (CoordError::ClockSkew("c".into()), 503, "clock_skew", "c"),
            (CoordError::NotFound, 404, "not_found", "no such key"),
            (
                CoordError::Exists("e".into()),
                412,
                "precondition_failed",
                "e",
            ),
            (
                CoordError::DiskFull("d".into()),
                507,
                "insufficient_storage",
                "d",
            ),
            (
                CoordError::LeaderRefused {
                    status: 413,
                    message: "big".into(),
                },
                413,
                "payload_too_large",
                "big",
            ),
            (
                CoordError::LeaderRefused {
                    status: 400,
                    message: "bad".into(),
                },
                400,
                "bad_request",
                "bad",
            ),
            (CoordError::Internal("i".into()), 500, "internal", "i"),
        ];
        for (e, status, code, message) in cases {
            assert_eq!(
                ApiError::from(e),
                ApiError::new(status, code, message.into())
            );
        }
    }
}
