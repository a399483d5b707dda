//! `csv-summary`: a kind of work that is not built in, registered through offload's Rust API.
//!
//! Given a CSV file (with a header row) and the columns to describe, it computes per column the
//! count of numbers, the cells that are not numbers, min, max, mean, standard deviation and the
//! 50th, 90th and 99th percentiles, and returns them as JSON: the report a data team would
//! otherwise compute in a request handler. The input is checked at submit (a header, the columns
//! named exist, at most `max_rows` rows); the work reports progress and stops when cancelled.

use offload::kind::{InvalidInput, Kind, PayloadRecord};
use offload::workers::{JobContext, JobFailure, JobOutput, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The kind, with its limit.
pub struct CsvSummary {
    /// Most data rows one CSV may have.
    pub max_rows: usize,
}

/// What one job works on: the CSV and the columns to describe (all of them when none are named).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryInput {
    pub csv: String,
    #[serde(default)]
    pub columns: Vec<String>,
}

/// Rows between two progress reports and cancel checks.
const CHUNK: usize = 2_000;

impl Kind for CsvSummary {
    type Input = SummaryInput;

    fn name(&self) -> &'static str {
        "csv-summary"
    }

    fn encode(&self, input: &SummaryInput) -> PayloadRecord {
        PayloadRecord { spec: serde_json::to_vec(input).expect("strings serialize"), data: None }
    }

    fn decode(&self, record: PayloadRecord) -> Result<SummaryInput, String> {
        serde_json::from_slice(&record.spec).map_err(|e| format!("stored csv-summary input: {e}"))
    }

    fn weight(&self, input: &SummaryInput) -> usize {
        input.csv.len() + input.columns.iter().map(|c| c.len() + 24).sum::<usize>() + 64
    }

    fn parse_json(&self, input: Value) -> Option<Result<SummaryInput, InvalidInput>> {
        Some(self.check(input))
    }

    fn run(&self, input: SummaryInput, job: &mut JobContext) -> Outcome {
        let mut lines = input.csv.lines();
        let header = split(lines.next().unwrap_or_default());
        let wanted: Vec<usize> = if input.columns.is_empty() {
            (0..header.len()).collect()
        } else {
            input.columns.iter().filter_map(|c| header.iter().position(|h| h == c)).collect()
        };
        let total = input.csv.lines().count().saturating_sub(1).max(1);
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); wanted.len()];
        let mut not_numbers = vec![0usize; wanted.len()];
        let mut rows = 0usize;
        for line in lines.filter(|l| !l.trim().is_empty()) {
            if rows.is_multiple_of(CHUNK) {
                job.checkpoint()?;
                job.progress(0.9 * rows as f32 / total as f32, || format!("row {rows} of {total}"));
            }
            rows += 1;
            let cells = split(line);
            for (slot, &col) in wanted.iter().enumerate() {
                match cells.get(col).map(|c| c.trim()).filter(|c| !c.is_empty()) {
                    Some(cell) => match cell.parse::<f64>() {
                        Ok(v) if v.is_finite() => values[slot].push(v),
                        _ => not_numbers[slot] += 1,
                    },
                    None => not_numbers[slot] += 1,
                }
            }
        }
        job.checkpoint()?;
        job.progress(0.9, || "summarizing".into());
        let mut columns = serde_json::Map::new();
        for (slot, &col) in wanted.iter().enumerate() {
            columns.insert(header[col].clone(), describe(&mut values[slot], not_numbers[slot]));
        }
        let report = json!({"rows": rows, "columns": columns});
        let bytes = serde_json::to_vec_pretty(&report)
            .map_err(|e| JobFailure::Error(offload::error::ErrorBody::new("encode_failed", e.to_string())))?;
        Ok(JobOutput {
            bytes: bytes.into(),
            content_type: "application/json",
            filename: "summary.json".into(),
            extra: Default::default(),
        })
    }
}

impl CsvSummary {
    /// The input, checked: cheap (one pass over the header and a count of lines).
    fn check(&self, input: Value) -> Result<SummaryInput, InvalidInput> {
        let input: SummaryInput =
            serde_json::from_value(input).map_err(|e| InvalidInput::new("invalid_field", format!("input: {e}")))?;
        let Some(first) = input.csv.lines().next().filter(|l| !l.trim().is_empty()) else {
            return Err(InvalidInput::new("invalid_field", "input.csv: empty; the first line must be a header"));
        };
        let header = split(first);
        for name in &input.columns {
            if !header.contains(name) {
                let message = format!("input.columns: no column {name:?} in the header ({})", header.join(", "));
                return Err(InvalidInput::new("invalid_field", message));
            }
        }
        let rows = input.csv.lines().count() - 1;
        if rows > self.max_rows {
            let message = format!("input.csv: {rows} rows, more than the {} allowed", self.max_rows);
            return Err(InvalidInput::new("too_many_rows", message));
        }
        Ok(input)
    }
}

/// The cells of one line: comma-separated, `"quoted, with "" for a quote"` allowed.
fn split(line: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => cells.push(std::mem::take(&mut cell)),
            (c, _) => cell.push(c),
        }
    }
    cells.push(cell);
    cells
}

/// Count, min, max, mean, standard deviation and percentiles of `values`.
fn describe(values: &mut [f64], not_numbers: usize) -> Value {
    if values.is_empty() {
        return json!({"count": 0, "not_numbers": not_numbers});
    }
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let pct = |p: f64| values[((p / 100.0) * (n - 1.0)).round() as usize];
    json!({
        "count": values.len(), "not_numbers": not_numbers,
        "min": values[0], "max": values[values.len() - 1],
        "mean": mean, "stddev": var.sqrt(),
        "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0),
    })
}
