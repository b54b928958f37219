//! `reports-worker`: a custom worker binary, the one to copy when you write steps in Rust. It is
//! the stock `warren-worker` command line (`run`, `supervise`, every flag) plus one Rust handler,
//! `analyze`, which `examples/reports-worker.toml` names with `handler = "analyze"` between two
//! Python command steps. Handler and commands meet on the same JSON: `analyze` reads what
//! `steps/fetch.py` writes and writes what `steps/render.py` reads.
//!
//! ```sh
//! cargo build -p warren-examples --bin reports-worker
//! target/debug/reports-worker run --config examples/reports-worker.toml
//! ```
//!
//! examples/README.md says more, and how to submit a job to it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use warren_worker::{StepContext, StepError, StepHandler};

/// The step input: the document `fetch` wrote. Fields not named here are ignored; a missing one
/// (or one of the wrong type) fails the job at once, as a permanent failure, before `run`.
#[derive(Debug, Deserialize)]
struct Document {
    tenant: Option<String>,
    topic: String,
    title: String,
    text: String,
}

/// The step output, the input of `render`.
#[derive(Debug, Serialize)]
struct Analysis {
    tenant: Option<String>,
    topic: String,
    title: String,
    stats: Stats,
    /// The five most frequent words that are not stop words, with their counts; ties in
    /// alphabetical order, so a rerun gives the same output.
    top_words: Vec<(String, usize)>,
    /// The first sentence.
    excerpt: String,
}

#[derive(Debug, PartialEq, Serialize)]
struct Stats {
    words: usize,
    unique_words: usize,
    sentences: usize,
    paragraphs: usize,
    avg_word_length: f64,
    reading_time_s: u64,
}

/// The `analyze` step. A struct rather than an async function (`handler_fn`) because it holds
/// what every attempt shares, made once at start-up: here a word list, in your worker perhaps a
/// database pool or an HTTP client.
struct Analyze {
    stopwords: BTreeSet<&'static str>,
    words_per_minute: usize,
}

impl Analyze {
    fn new() -> Self {
        let stopwords = "a an and are as at be but by for from in is it its of on or since so \
                         that the their this to while with whereas although because more less";
        Self {
            stopwords: stopwords.split_whitespace().collect(),
            words_per_minute: 200,
        }
    }

    /// The analysis itself: pure, so it is tested without a broker (below).
    fn analyze(&self, doc: Document) -> Analysis {
        let lower = doc.text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '\''))
            .filter(|w| !w.is_empty())
            .collect();
        let sentences: Vec<&str> = doc
            .text
            .split(['.', '!', '?'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let paragraphs = doc
            .text
            .split("\n\n")
            .filter(|p| !p.trim().is_empty())
            .count();

        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for word in words.iter().filter(|w| !self.stopwords.contains(*w)) {
            *counts.entry(word).or_default() += 1;
        }
        let mut top_words: Vec<(String, usize)> = counts
            .into_iter()
            .map(|(w, n)| (w.to_string(), n))
            .collect();
        // The map iterates alphabetically and the sort is stable: ties stay alphabetical.
        top_words.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        top_words.truncate(5);

        let letters: usize = words.iter().map(|w| w.len()).sum();
        let avg_word_length = if words.is_empty() {
            0.0
        } else {
            (letters as f64 / words.len() as f64 * 100.0).round() / 100.0
        };
        let stats = Stats {
            words: words.len(),
            unique_words: words.iter().collect::<BTreeSet<_>>().len(),
            sentences: sentences.len(),
            paragraphs,
            avg_word_length,
            reading_time_s: ((words.len() * 60) as f64 / self.words_per_minute as f64).round()
                as u64,
        };
        Analysis {
            excerpt: sentences
                .first()
                .map(|s| format!("{s}."))
                .unwrap_or_default(),
            tenant: doc.tenant,
            topic: doc.topic,
            title: doc.title,
            stats,
            top_words,
        }
    }
}

impl StepHandler for Analyze {
    type Input = Document;
    type Output = Analysis;

    /// `ctx` says which job, tenant and attempt this is; `ctx.idempotency_key()` is the key for
    /// side effects, since a step runs at least once.
    async fn run(&self, doc: Document, _ctx: StepContext) -> Result<Analysis, StepError> {
        if doc.text.trim().is_empty() {
            // Permanent: the same input will never do better, so no retry (the job fails and
            // waits in the dead-letter queue). StepError::retryable(..) would try again later.
            return Err(StepError::permanent("the document has no text"));
        }
        Ok(self.analyze(doc))
    }
}

fn main() -> ExitCode {
    // Register every handler this binary has, under the names configs use in `handler = ".."`.
    warren_worker::cli::main(|worker| worker.handler("analyze", Analyze::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn doc(text: &str) -> Document {
        Document {
            tenant: Some("acme".into()),
            topic: "tides".into(),
            title: "Tides".into(),
            text: text.into(),
        }
    }

    #[test]
    fn counts_words_sentences_and_paragraphs() {
        let a = Analyze::new().analyze(doc(
            "The tide turns. Tide data, tide power!\n\nPower of the moon's pull?",
        ));
        assert_eq!(
            a.stats,
            Stats {
                words: 12,
                unique_words: 8,
                sentences: 3,
                paragraphs: 2,
                avg_word_length: 4.08,
                reading_time_s: 4,
            }
        );
        assert_eq!(
            a.top_words,
            [
                ("tide".to_string(), 3),
                ("power".to_string(), 2),
                ("data".to_string(), 1),
                ("moon's".to_string(), 1),
                ("pull".to_string(), 1),
            ]
        );
        assert_eq!(a.excerpt, "The tide turns.");
        assert_eq!(a.tenant.as_deref(), Some("acme"));
    }

    proptest! {
        #[test]
        fn top_words_are_the_most_frequent_non_stop_words(text in "[a-e .!\n]{0,200}") {
            let analyze = Analyze::new();
            let a = analyze.analyze(doc(&text));
            prop_assert!(a.top_words.len() <= 5);
            prop_assert!(a.stats.unique_words <= a.stats.words);
            for pair in a.top_words.windows(2) {
                prop_assert!(pair[0].1 > pair[1].1 || (pair[0].1 == pair[1].1 && pair[0].0 < pair[1].0));
            }
            for (word, n) in &a.top_words {
                prop_assert!(!analyze.stopwords.contains(word.as_str()));
                prop_assert!(*n <= a.stats.words);
            }
        }
    }
}
