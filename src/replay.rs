//! `segmenter replay`: run the engine over an NDJSON file with the event clock, no Kafka.
//!
//! Uses the same decoder, engine and RocksDB store as the service, so a replay is a faithful
//! preview of what the service would publish for the same input.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decode::{DecodeError, Decoder};
use crate::engine::{ClockMode, EngineConfig, EngineError, Outcome, PartitionEngine};
use crate::model::{Change, Millis};
use crate::rules::Program;
use crate::store::rocks::{RocksOptions, RocksStore};
use crate::store::StoreError;

/// Events between two write-backs of state to RocksDB (the engine's cache bound keeps memory
/// in check between them).
const FLUSH_EVERY: u64 = 250_000;

/// Counts reported at the end of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplaySummary {
    /// Non-blank input lines.
    pub read: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub changes: u64,
    pub timers_fired: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading input: {0}")]
    Input(std::io::Error),
    #[error("writing output: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a replay needs besides its input and outputs.
pub struct ReplayJob<'a> {
    pub program: Arc<Program>,
    pub decoder: Decoder,
    pub engine: EngineConfig,
    pub state_dir: &'a Path,
    pub until: Option<Millis>,
}

/// Replays `input` (NDJSON), writing change events to `out` and rejected lines to `diagnostics`.
pub fn replay(
    job: ReplayJob<'_>,
    input: impl BufRead,
    mut out: impl Write,
    mut diagnostics: impl Write,
) -> Result<(ReplaySummary, Duration), ReplayError> {
    let started = Instant::now();
    let store = Arc::new(RocksStore::open(job.state_dir, RocksOptions::default())?);
    let config = EngineConfig {
        clock: ClockMode::Event,
        ..job.engine
    };
    let mut engine = PartitionEngine::open(0, job.program, store, config)?;
    let mut summary = ReplaySummary::default();
    let mut changes: Vec<Change> = Vec::new();
    let mut line = Vec::with_capacity(1024);
    let mut input = input;
    let mut line_number = 0u64;
    let line_limit = job.decoder.max_bytes() + 2;
    loop {
        line.clear();
        let read =
            read_line_bounded(&mut input, &mut line, line_limit).map_err(ReplayError::Input)?;
        let Some(length) = read else {
            break;
        };
        line_number += 1;
        let trimmed = trim_line(&line);
        if trimmed.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        summary.read += 1;
        let decoded = if length > line.len() {
            Err(DecodeError::TooLarge {
                size: length - trailing_cr(&line),
                limit: job.decoder.max_bytes(),
            })
        } else {
            job.decoder.decode(trimmed)
        };
        let event = match decoded {
            Ok(event) => event,
            Err(err) => {
                summary.rejected += 1;
                writeln!(diagnostics, "line {line_number}: {err}").map_err(ReplayError::Output)?;
                continue;
            }
        };
        if engine.apply_event(&event, &mut changes)? == Outcome::Duplicate {
            summary.duplicates += 1;
        }
        write_changes(&mut out, &mut changes, &mut summary)?;
        if summary.read % FLUSH_EVERY == 0 {
            engine.flush()?;
        }
    }
    if let Some(until) = job.until {
        engine.advance(until, &mut changes)?;
        write_changes(&mut out, &mut changes, &mut summary)?;
    }
    engine.flush()?;
    out.flush().map_err(ReplayError::Output)?;
    summary.timers_fired = engine.stats().timers_fired;
    Ok((summary, started.elapsed()))
}

fn write_changes(
    out: &mut impl Write,
    changes: &mut Vec<Change>,
    summary: &mut ReplaySummary,
) -> Result<(), ReplayError> {
    for change in changes.drain(..) {
        summary.changes += 1;
        let json = change.to_json();
        out.write_all(json.as_bytes())
            .map_err(ReplayError::Output)?;
        out.write_all(b"\n").map_err(ReplayError::Output)?;
    }
    Ok(())
}

/// Reads one line into `line` (without its `\n`), keeping at most `limit` bytes of it: an
/// oversized line is still consumed to its end but never held in memory whole. Returns the
/// line's full length, or `None` at the end of the input.
fn read_line_bounded(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<usize>> {
    let mut length = 0;
    let mut any = false;
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(any.then_some(length));
        }
        any = true;
        let (take, newline) = match chunk.iter().position(|b| *b == b'\n') {
            Some(end) => (end, true),
            None => (chunk.len(), false),
        };
        let room = limit.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..take.min(room)]);
        input.consume(take + usize::from(newline));
        length += take;
        if newline {
            return Ok(Some(length));
        }
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    &line[..line.len() - trailing_cr(line)]
}

fn trailing_cr(line: &[u8]) -> usize {
    usize::from(line.ends_with(b"\r"))
}

impl ReplaySummary {
    /// The one-line summary printed on stderr.
    pub fn line(&self, elapsed: Duration) -> String {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        format!(
            "replay: read {} events, rejected {}, duplicates dropped {}, changes {}, timers fired {}, {:.0} events/s ({:.3} s)",
            self.read,
            self.rejected,
            self.duplicates,
            self.changes,
            self.timers_fired,
            self.read as f64 / seconds,
            seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_truncated_not_buffered_and_the_next_line_survives() {
        let mut text = vec![b'x'; 10_000];
        text.extend_from_slice(b"\nshort\nlast");
        let mut input = std::io::BufReader::with_capacity(64, &text[..]);
        let mut line = Vec::new();
        let mut next = |line: &mut Vec<u8>| {
            line.clear();
            read_line_bounded(&mut input, line, 100).expect("read")
        };
        assert_eq!(next(&mut line), Some(10_000));
        assert_eq!(line.len(), 100);
        assert_eq!(next(&mut line), Some(5));
        assert_eq!(line, b"short");
        assert_eq!(next(&mut line), Some(4));
        assert_eq!(line, b"last");
        assert_eq!(next(&mut line), None);
    }
}
