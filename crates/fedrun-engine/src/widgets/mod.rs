//! NVFlare's built-in client widgets, and the admin commands they answer.
//!
//! NVFlare's client engine creates two widgets and appends them to its event handlers: the
//! [`InfoCollector`] (`info_collector`: run stats and the error log) and the [`FedEventRunner`]
//! (`fed_event_runner`: fed events to and from the server job). [`ClientEngine::builder`]
//! registers both the same way, so `get_widget("info_collector")` and
//! `get_widget("fed_event_runner")` resolve, and
//! [`EngineHandle::info_collector`](crate::EngineHandle::info_collector) /
//! [`EngineHandle::fed_event_runner`](crate::EngineHandle::fed_event_runner) return them typed.
//!
//! [`answer_info_command`] is what the CJ's command handler calls for the parent's
//! `show_stats`, `show_errors` and `reset_errors` commands (channel `client_command`, the command
//! as the topic): it returns the reply payload NVFlare's CJ sends.
//!
//! [`ClientEngine::builder`]: crate::ClientEngine::builder

use fedrun_core::constants::info_command;
use fedrun_core::Value;

use crate::error::EngineError;
use crate::handle::EngineHandle;

pub mod fed_event;
pub mod info_collector;

pub use fed_event::{FedEventRunner, FED_EVENT_QUEUE, MAX_EVENT_ID_CACHE_SIZE};
pub use info_collector::{add_stats, set_stats, InfoCollector};

/// The reply of `show_stats` when no component reported stats (NVFlare's text).
pub const NO_STATS: &str = "No stats info";

/// The reply of `show_errors` when the error log is empty (NVFlare's text).
pub const NO_ERRORS: &str = "No Errors";

/// Answers one of the info admin commands as NVFlare's CJ does, and returns the reply payload:
///
/// | command | payload |
/// |---|---|
/// | `show_stats` | the collected `{group: info}` map, or `"No stats info"` when empty |
/// | `show_errors` | `{group: {key: "<YYYY-mm-dd HH:MM:SS>: <message>"}}` with the latest error per group and key (NVFlare's shape), or `"No Errors"` when the log is empty |
/// | `reset_errors` | none (`None`: a reply without payload); the error log is cleared |
///
/// The cell reply carries `cn__return_code` `ok` in every case.
///
/// # Errors
/// [`EngineError::UnknownCommand`] for any other command (NVFlare's CJ answers it with the cell
/// code `invalid_request`); [`EngineError::ActorGone`] when the engine is stopped.
///
/// # Example
/// ```
/// use fedrun_cell::Network;
/// use fedrun_core::Value;
/// use fedrun_engine::{answer_info_command, ClientEngine};
///
/// actix::System::new().block_on(async {
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     let stats = answer_info_command(&engine, "show_stats").await.unwrap();
///     assert_eq!(stats, Some(Value::from("No stats info")));
///     let errors = answer_info_command(&engine, "show_errors").await.unwrap();
///     assert_eq!(errors, Some(Value::from("No Errors")));
///     assert_eq!(answer_info_command(&engine, "reset_errors").await.unwrap(), None);
///     assert!(answer_info_command(&engine, "sys_info").await.is_err());
/// });
/// ```
pub async fn answer_info_command(
    engine: &EngineHandle,
    command: &str,
) -> Result<Option<Value>, EngineError> {
    match command {
        info_command::SHOW_STATS => {
            let stats = engine.show_stats().await?;
            Ok(Some(if stats.is_empty() {
                Value::from(NO_STATS)
            } else {
                Value::Map(stats)
            }))
        }
        info_command::SHOW_ERRORS => Ok(Some(match engine.show_errors().await? {
            Some(report) if !report.is_empty() => report.latest_value(),
            _ => Value::from(NO_ERRORS),
        })),
        info_command::RESET_ERRORS => {
            engine.reset_errors().await?;
            Ok(None)
        }
        other => Err(EngineError::UnknownCommand(other.to_owned())),
    }
}
