//! The headers a dead letter in `{ns}.dlq` carries (docs/wire-format.md, "Dead letters"). The
//! worker writes them; the producer SDK's `dlq` operations read them.

/// A short machine code: why the message was set aside.
pub const REASON: &str = "x-warren-reason";
/// Human-readable detail: the step's error, with the tail of stderr for commands.
pub const ERROR: &str = "x-warren-error";
/// The queue the message was taken from.
pub const QUEUE: &str = "x-warren-queue";
/// When it was set aside, ms since the Unix epoch, as decimal text.
pub const FAILED_AT: &str = "x-warren-failed-at";

/// Set by RabbitMQ when it dead-letters a message itself (a quorum queue's delivery limit).
pub const BROKER_REASON: &str = "x-first-death-reason";
/// The queue RabbitMQ dead-lettered the message from.
pub const BROKER_QUEUE: &str = "x-first-death-queue";

/// Why a message was set aside: the value of [`REASON`] (and of the dead-letter metric's
/// `reason` label). The spellings are part of the wire format. A dead letter written by another
/// tool may carry any text; readers keep such text as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The step failed for good: a permanent error, or its last attempt failed.
    Failed,
    /// Not a valid envelope.
    Undecodable,
    /// Its input is over `max_payload_bytes`.
    Oversized,
    /// Its pipeline is not in the worker's config.
    UnknownPipeline,
    /// Its step is not in its pipeline in the worker's config.
    UnknownStep,
    /// It names another step than the queue it sat in.
    WrongQueue,
    /// RabbitMQ set it aside itself: a quorum queue's delivery limit (RabbitMQ 4).
    DeliveryLimit,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Failed,
        Reason::Undecodable,
        Reason::Oversized,
        Reason::UnknownPipeline,
        Reason::UnknownStep,
        Reason::WrongQueue,
        Reason::DeliveryLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Failed => "failed",
            Reason::Undecodable => "undecodable",
            Reason::Oversized => "oversized",
            Reason::UnknownPipeline => "unknown-pipeline",
            Reason::UnknownStep => "unknown-step",
            Reason::WrongQueue => "wrong-queue",
            Reason::DeliveryLimit => "delivery-limit",
        }
    }

    /// The reason shown for a message RabbitMQ dead-lettered itself, from its
    /// [`BROKER_REASON`] (`delivery_limit`, or another of the broker's codes): its text with
    /// `-` for `_`, so the broker's `delivery_limit` reads as [`Reason::DeliveryLimit`].
    pub fn of_broker(broker_reason: &str) -> String {
        broker_reason.replace('_', "-")
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Text that is not one of warren's [`Reason`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dead-letter reason {0:?}")]
pub struct UnknownReason(pub String);

impl std::str::FromStr for Reason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_are_the_wire_format() {
        let spelled: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            spelled,
            [
                "failed",
                "undecodable",
                "oversized",
                "unknown-pipeline",
                "unknown-step",
                "wrong-queue",
                "delivery-limit"
            ]
        );
        for r in Reason::ALL {
            assert_eq!(r.to_string(), r.as_str());
            assert_eq!(r.as_str().parse::<Reason>(), Ok(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), r);
        }
        assert_eq!(
            "exploded".parse::<Reason>(),
            Err(UnknownReason("exploded".into()))
        );
    }

    #[test]
    fn the_brokers_delivery_limit_reads_as_ours() {
        assert_eq!(
            Reason::of_broker("delivery_limit").parse::<Reason>(),
            Ok(Reason::DeliveryLimit)
        );
        assert_eq!(Reason::of_broker("expired"), "expired");
    }
}
