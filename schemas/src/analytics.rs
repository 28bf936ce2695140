//! `analytics.events`: task lifecycle events and API events, told apart by `event_type`.
//!
//! Task lifecycle (`task_created`, `task_assigned`, `task_started`, `task_completed`,
//! `task_failed`):
//! ```json
//! {"event_type": "task_created", "task_id": "t-1", "task_type": "voice_recognition",
//!  "priority": "HIGH", "agent_id": "spark-agent-1", "timestamp": "..."}
//! ```
//! API events (any other `event_type`, with an `endpoint`):
//! ```json
//! {"event_type": "llm_generate", "endpoint": "/api/llm/generate", "data": {"model": "m"},
//!  "user_id": "admin", "timestamp": "..."}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{DecodeError, ErrorKind};
use crate::json;
use crate::time::Micros;
use crate::DecodeLimits;

/// A step in a task's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEventKind {
    /// `task_created`.
    Created,
    /// `task_assigned`.
    Assigned,
    /// `task_started`.
    Started,
    /// `task_completed`.
    Completed,
    /// `task_failed`.
    Failed,
}

impl TaskEventKind {
    /// The `event_type` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEventKind::Created => "task_created",
            TaskEventKind::Assigned => "task_assigned",
            TaskEventKind::Started => "task_started",
            TaskEventKind::Completed => "task_completed",
            TaskEventKind::Failed => "task_failed",
        }
    }

    /// The kind for an `event_type`, if it is a task lifecycle type.
    pub fn from_event_type(s: &str) -> Option<Self> {
        Some(match s {
            "task_created" => TaskEventKind::Created,
            "task_assigned" => TaskEventKind::Assigned,
            "task_started" => TaskEventKind::Started,
            "task_completed" => TaskEventKind::Completed,
            "task_failed" => TaskEventKind::Failed,
            _ => return None,
        })
    }
}

/// A task lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Which step.
    pub kind: TaskEventKind,
    /// The task.
    pub task_id: String,
    /// Task type, e.g. `voice_recognition`; required on `task_created`.
    pub task_type: Option<String>,
    /// Priority as sent (`HIGH`, `MEDIUM`, ...).
    pub priority: Option<String>,
    /// Agent the task is assigned to or runs on; required on `task_assigned`.
    pub agent_id: Option<String>,
    /// Event time, microseconds since the epoch (UTC).
    pub time_us: Micros,
}

/// An API request event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiEvent {
    /// What happened, e.g. `llm_generate`.
    pub event_type: String,
    /// The endpoint, e.g. `/api/llm/generate`.
    pub endpoint: String,
    /// The user, when known (`null` for anonymous calls).
    pub user_id: Option<String>,
    /// The `data` object re-serialized as compact JSON, when present.
    pub data: Option<String>,
    /// Event time, microseconds since the epoch (UTC).
    pub time_us: Micros,
}

/// Anything on `analytics.events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AnalyticsEvent {
    /// Task lifecycle.
    Task(TaskEvent),
    /// API request.
    Api(ApiEvent),
}

impl AnalyticsEvent {
    /// Event time of either kind.
    pub fn time_us(&self) -> Micros {
        match self {
            AnalyticsEvent::Task(t) => t.time_us,
            AnalyticsEvent::Api(a) => a.time_us,
        }
    }

    /// Decodes and validates one message.
    pub fn decode(payload: &[u8], limits: &DecodeLimits) -> Result<Self, DecodeError> {
        let obj = json::parse_object(payload, limits)?;
        let event_type = json::required_ident(&obj, "event_type")?;
        let time_us = limits.event_time(json::required(&obj, "timestamp")?, "timestamp")?;
        if let Some(kind) = TaskEventKind::from_event_type(&event_type) {
            let task_type = json::optional_ident(&obj, "task_type")?;
            let agent_id = json::optional_ident(&obj, "agent_id")?;
            if kind == TaskEventKind::Created && task_type.is_none() {
                return Err(DecodeError::field(
                    ErrorKind::MissingField,
                    "task_type",
                    "required on task_created",
                ));
            }
            if kind == TaskEventKind::Assigned && agent_id.is_none() {
                return Err(DecodeError::field(
                    ErrorKind::MissingField,
                    "agent_id",
                    "required on task_assigned",
                ));
            }
            return Ok(AnalyticsEvent::Task(TaskEvent {
                kind,
                task_id: json::required_ident(&obj, "task_id")?,
                task_type,
                priority: json::optional_ident(&obj, "priority")?,
                agent_id,
                time_us,
            }));
        }
        if event_type.starts_with("task_") {
            return Err(DecodeError::field(
                ErrorKind::InvalidValue,
                "event_type",
                format!(
                    "\"{}\" is not a task lifecycle type (task_created, task_assigned, task_started, task_completed, task_failed)",
                    json::truncate(&event_type, 64)
                ),
            ));
        }
        let endpoint = json::required_ident(&obj, "endpoint")?;
        if !endpoint.starts_with('/') {
            return Err(DecodeError::field(
                ErrorKind::InvalidValue,
                "endpoint",
                "must start with '/'",
            ));
        }
        let data = match obj.get("data") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) if json::contains_nul(v) => {
                return Err(DecodeError::field(
                    ErrorKind::InvalidValue,
                    "data",
                    "contains a NUL character (\\u0000), which PostgreSQL's jsonb cannot store",
                ))
            }
            Some(v @ Value::Object(_)) => Some(v.to_string()),
            Some(other) => {
                return Err(DecodeError::field(
                    ErrorKind::WrongType,
                    "data",
                    format!("expected an object, got {}", json::type_name(other)),
                ))
            }
        };
        Ok(AnalyticsEvent::Api(ApiEvent {
            event_type,
            endpoint,
            user_id: json::optional_ident(&obj, "user_id")?,
            data,
            time_us,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<AnalyticsEvent, DecodeError> {
        AnalyticsEvent::decode(s.as_bytes(), &DecodeLimits::default())
    }

    #[test]
    fn task_lifecycle() {
        let e = decode(
            r#"{"event_type": "task_created", "task_id": "t-1", "task_type": "voice_recognition",
            "priority": "HIGH", "agent_id": "spark-agent-1", "timestamp": "2025-11-05T14:03:07"}"#,
        )
        .unwrap();
        let AnalyticsEvent::Task(t) = e else {
            panic!("expected a task event")
        };
        assert_eq!(t.kind, TaskEventKind::Created);
        assert_eq!(t.task_type.as_deref(), Some("voice_recognition"));
        for kind in [
            "task_assigned",
            "task_started",
            "task_completed",
            "task_failed",
        ] {
            let s = format!(
                r#"{{"event_type":"{kind}","task_id":"t-1","agent_id":"a","timestamp":1762351387123}}"#
            );
            let AnalyticsEvent::Task(t) = decode(&s).unwrap() else {
                panic!("task")
            };
            assert_eq!(t.kind.as_str(), kind);
        }
    }

    #[test]
    fn api_event_with_null_user() {
        let e = decode(
            r#"{"event_type": "llm_generate", "endpoint": "/api/llm/generate",
            "data": {"model": "m"}, "user_id": null, "timestamp": "2025-11-05T14:03:07.5"}"#,
        )
        .unwrap();
        let AnalyticsEvent::Api(a) = e else {
            panic!("expected an api event")
        };
        assert_eq!(a.endpoint, "/api/llm/generate");
        assert_eq!(a.user_id, None);
        assert_eq!(a.data.as_deref(), Some(r#"{"model":"m"}"#));
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_text_not_nul() {
        let e = decode(
            r#"{"event_type":"llm_generate","endpoint":"/x","data":{"path":"C:\\u0000"},"timestamp":1762351387123}"#,
        )
        .unwrap();
        let AnalyticsEvent::Api(a) = e else {
            panic!("expected an API event")
        };
        assert_eq!(a.data.as_deref(), Some(r#"{"path":"C:\\u0000"}"#));
    }

    #[test]
    fn bad_inputs() {
        let cases = [
            (
                r#"{"event_type":"task_created","task_id":"t","timestamp":1762351387123}"#,
                ErrorKind::MissingField,
                "task_type",
            ),
            (
                r#"{"event_type":"task_assigned","task_id":"t","timestamp":1762351387123}"#,
                ErrorKind::MissingField,
                "agent_id",
            ),
            (
                r#"{"event_type":"task_started","timestamp":1762351387123}"#,
                ErrorKind::MissingField,
                "task_id",
            ),
            (
                r#"{"event_type":"task_exploded","task_id":"t","timestamp":1762351387123}"#,
                ErrorKind::InvalidValue,
                "event_type",
            ),
            (
                r#"{"event_type":"llm_generate","timestamp":1762351387123}"#,
                ErrorKind::MissingField,
                "endpoint",
            ),
            (
                r#"{"event_type":"llm_generate","endpoint":"x","timestamp":1762351387123}"#,
                ErrorKind::InvalidValue,
                "endpoint",
            ),
            (
                r#"{"event_type":"llm_generate","endpoint":"/x","data":[1],"timestamp":1762351387123}"#,
                ErrorKind::WrongType,
                "data",
            ),
            (
                r#"{"endpoint":"/x","timestamp":1762351387123}"#,
                ErrorKind::MissingField,
                "event_type",
            ),
            // NUL cannot be stored by PostgreSQL (text or jsonb): a dead letter, not a batch
            // that fails in the sink forever.
            (
                r#"{"event_type":"task_started","task_id":"t\u0000","timestamp":1762351387123}"#,
                ErrorKind::InvalidValue,
                "task_id",
            ),
            (
                r#"{"event_type":"llm_generate","endpoint":"/x","data":{"a":[{"b":"\u0000"}]},"timestamp":1762351387123}"#,
                ErrorKind::InvalidValue,
                "data",
            ),
            (
                r#"{"event_type":"llm_generate","endpoint":"/x","data":{"k\u0000":1},"timestamp":1762351387123}"#,
                ErrorKind::InvalidValue,
                "data",
            ),
        ];
        for (input, kind, field) in cases {
            let e = decode(input).unwrap_err();
            assert_eq!(
                (e.kind, e.field.as_deref()),
                (kind, Some(field)),
                "{input}: {e}"
            );
        }
    }
}
