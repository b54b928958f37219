//! Handlers by name, type-erased to "JSON in, JSON out" so the runtime can hold any mix.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::handler::{StepContext, StepError, StepHandler};

/// A handler behind the JSON boundary.
pub(crate) type ErasedHandler =
    Arc<dyn Fn(Value, StepContext) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// Registered handlers. Names are unique.
#[derive(Default, Clone)]
pub(crate) struct Registry {
    handlers: BTreeMap<String, ErasedHandler>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// Adds `handler` as `name`; `Err(name)` if the name is taken.
    pub(crate) fn insert<H: StepHandler>(&mut self, name: &str, handler: H) -> Result<(), String> {
        if self.handlers.contains_key(name) {
            return Err(name.to_string());
        }
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |input, ctx| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                // Input that does not fit the handler's type will not fit on a retry either.
                let input = serde_json::from_value(input).map_err(|e| {
                    StepError::permanent(format!("input does not match the handler's type: {e}"))
                })?;
                let output = handler.run(input, ctx).await?;
                serde_json::to_value(output)
                    .map_err(|e| StepError::permanent(format!("output is not serialisable: {e}")))
            })
        });
        self.handlers.insert(name.to_string(), erased);
        Ok(())
    }

    pub(crate) fn get(&self, name: &str) -> Option<ErasedHandler> {
        self.handlers.get(name).cloned()
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::handler_fn;
    use serde_json::json;
    use warren_common::{JobId, Priority};

    fn ctx() -> StepContext {
        StepContext {
            job_id: JobId::new(),
            tenant: "t".into(),
            pipeline: "p".into(),
            step: "s".into(),
            attempt: 1,
            priority: Priority::Normal,
            trace: None,
        }
    }

    #[tokio::test]
    async fn typed_handlers_round_trip_through_json() {
        let mut r = Registry::default();
        r.insert(
            "double",
            handler_fn(|n: u64, _| async move { Ok::<_, StepError>(n * 2) }),
        )
        .unwrap();
        assert_eq!(
            r.insert("double", handler_fn(|v: Value, _| async { Ok(v) })),
            Err("double".into())
        );
        let double = r.get("double").unwrap();
        assert_eq!(double(json!(21), ctx()).await, Ok(json!(42)));
        let err = double(json!("nope"), ctx()).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(r.get("missing").is_none());
    }
}
