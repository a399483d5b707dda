//! The PDF document spec of `POST /generate-pdf`: the raw request as sent, and the
//! [`DocumentSpec`] it parses into once every field and limit has been checked.

use serde::{Deserialize, Serialize};

use crate::domain::object::Object;

/// Limits on a document, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct SpecLimits {
    pub max_rows: usize,
    pub max_columns: usize,
    pub max_cell_chars: usize,
    /// What the document may render to (checked against a lower bound at submit).
    pub render: RenderBudget,
}

/// What one document may render to, from configuration. A PDF job's memory grows with the text
/// lines and pages it renders (every line is a text operation kept until the file is written),
/// not with the request's bytes: a 400 KB request of empty rows is thousands of pages. A request
/// that must exceed the budget is refused at submit (`422 document_too_large`, from a cheap
/// lower bound); the layout enforces it exactly and fails the job the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderBudget {
    pub max_pages: usize,
    /// Lines of text (each line of a cell, a header cell or a paragraph).
    pub max_lines: usize,
}

/// Characters allowed in the title.
pub const MAX_TITLE_CHARS: usize = 500;
/// Characters allowed in the subtitle.
pub const MAX_SUBTITLE_CHARS: usize = 2_000;
/// Paragraphs allowed in one document.
pub const MAX_PARAGRAPHS: usize = 10_000;
/// Characters allowed in one paragraph.
pub const MAX_PARAGRAPH_CHARS: usize = 100_000;

/// The JSON body as clients send it. Unknown fields are refused so typos do not go unnoticed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PdfRequest {
    pub title: String,
    #[serde(default)]
    pub subtitle: Option<String>,
    #[serde(default)]
    pub paragraphs: Option<Vec<String>>,
    #[serde(default)]
    pub table: Option<Object<TableRequest>>,
    #[serde(default)]
    pub page_size: Option<String>,
    /// Parsed by the handler into a [`super::callback::CallbackUrl`] (it needs the policy).
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Test-only: makes the job panic, hang, run slowly or abort the process (not in release builds).
    #[cfg(feature = "test-hooks")]
    #[serde(default)]
    pub test_hook: Option<TestHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRequest {
    pub columns: Vec<Cell>,
    /// Missing or null: no rows.
    #[serde(default)]
    pub rows: Option<Vec<Vec<Cell>>>,
}

/// A table cell: text, or a number, boolean or null written as text.
///
/// Deserialized by hand: `#[serde(untagged)]` buffers every value and tries each variant in turn,
/// which made parsing a 20-page table (4,000 cells) cost more than a millisecond of HTTP-thread
/// CPU. Numbers arrive as u64/i64/f64: this needs serde_json without its `arbitrary_precision`
/// feature (with it, numbers come as maps and every numeric cell would be refused; the unit test
/// `cells_of_every_json_type_become_text_and_others_are_refused` would catch that).
#[derive(Debug, PartialEq)]
pub enum Cell {
    Text(String),
    Number(serde_json::Number),
    Bool(bool),
    Null,
}

impl<'de> Deserialize<'de> for Cell {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CellVisitor;

        impl serde::de::Visitor<'_> for CellVisitor {
            type Value = Cell;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table cell: a string, number, boolean or null")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Cell, E> {
                Ok(Cell::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Cell, E> {
                Ok(Cell::Text(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Cell, E> {
                Ok(Cell::Number(v.into()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Cell, E> {
                Ok(Cell::Number(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Cell, E> {
                serde_json::Number::from_f64(v).map(Cell::Number).ok_or_else(|| E::custom("not a finite number"))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Cell, E> {
                Ok(Cell::Bool(v))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Cell, E> {
                Ok(Cell::Null)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Cell, E> {
                Ok(Cell::Null)
            }
        }

        deserializer.deserialize_any(CellVisitor)
    }
}

impl Cell {
    fn into_text(self) -> String {
        match self {
            Cell::Text(s) => s,
            Cell::Number(n) => n.to_string(),
            Cell::Bool(b) => b.to_string(),
            Cell::Null => String::new(),
        }
    }
}

/// Test-only ways to misbehave, for the reliability tests.
#[cfg(feature = "test-hooks")]
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TestHook {
    /// Panic inside the worker.
    Panic,
    /// Never finish on its own (checks for cancel and timeout every few milliseconds).
    Hang,
    /// Spend this many milliseconds on every page.
    SlowPages { millis: u64 },
    /// Abort the whole process inside the job (`std::process::abort`): a "poison job".
    Abort,
}

/// Stored as `"a4"` or `"letter"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PageSize {
    A4,
    Letter,
}

impl PageSize {
    /// Width and height in PDF points (1/72 inch).
    pub fn points(self) -> (f32, f32) {
        match self {
            PageSize::A4 => (595.28, 841.89),
            PageSize::Letter => (612.0, 792.0),
        }
    }
}

/// A document that is valid by construction: every limit checked, text cleaned of control
/// characters, no row wider than the header (missing cells are empty; they are not stored).
///
/// Serialize/Deserialize are its stored form (see [`super::JobPayload::encode`]), not a way to
/// read requests: clients' JSON goes through [`PdfRequest`] and [`DocumentSpec::parse`]. Unknown
/// keys are ignored on purpose, so a record stored with `test_hook` by a build with the
/// `test-hooks` feature still loads in one without it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocumentSpec {
    pub title: String,
    #[serde(default)]
    pub subtitle: Option<String>,
    #[serde(default)]
    pub paragraphs: Vec<String>,
    #[serde(default)]
    pub table: Option<Table>,
    pub page_size: PageSize,
    #[cfg(feature = "test-hooks")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_hook: Option<TestHook>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub columns: Vec<String>,
    /// Each row has at most `columns.len()` cells; the missing ones are empty.
    pub rows: Vec<Vec<String>>,
}

/// Why a document was refused: the field it names, and a stable code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub code: &'static str,
    pub message: String,
}

fn invalid(code: &'static str, message: String) -> SpecError {
    SpecError { code, message }
}

impl DocumentSpec {
    /// A document with only a title (handy for tests and benchmarks).
    pub fn titled(title: &str) -> Self {
        DocumentSpec {
            title: title.to_string(),
            subtitle: None,
            paragraphs: Vec::new(),
            table: None,
            page_size: PageSize::A4,
            #[cfg(feature = "test-hooks")]
            test_hook: None,
        }
    }

    pub fn parse(req: PdfRequest, limits: &SpecLimits) -> Result<Self, SpecError> {
        let title = clean_line(req.title);
        if title.trim().is_empty() {
            return Err(invalid("invalid_field", "title: must not be empty".into()));
        }
        check_len("title", &title, MAX_TITLE_CHARS, "text_too_long")?;
        let subtitle = req.subtitle.map(clean_line).filter(|s| !s.trim().is_empty());
        if let Some(s) = &subtitle {
            check_len("subtitle", s, MAX_SUBTITLE_CHARS, "text_too_long")?;
        }
        let paragraphs = req.paragraphs.unwrap_or_default();
        if paragraphs.len() > MAX_PARAGRAPHS {
            return Err(invalid(
                "too_many_paragraphs",
                format!("paragraphs: {} paragraphs, the limit is {MAX_PARAGRAPHS}", paragraphs.len()),
            ));
        }
        let paragraphs = paragraphs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                check_len(&format!("paragraphs[{i}]"), p, MAX_PARAGRAPH_CHARS, "text_too_long")?;
                Ok(clean_paragraph(p))
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        let table = req.table.map(|t| parse_table(t.into_inner(), limits)).transpose()?;
        let page_size = match req.page_size.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("a4") => PageSize::A4,
            Some("letter") => PageSize::Letter,
            Some(_) => {
                return Err(invalid("invalid_field", "page_size: must be \"A4\" or \"Letter\"".into()));
            }
        };
        Ok(DocumentSpec {
            title,
            subtitle,
            paragraphs,
            table,
            page_size,
            #[cfg(feature = "test-hooks")]
            test_hook: req.test_hook,
        })
    }

    /// Approximate heap bytes this spec holds, counted against the queued-bytes budget.
    pub fn approx_bytes(&self) -> usize {
        const STRING: usize = std::mem::size_of::<String>();
        let text = |s: &String| s.len() + STRING;
        let mut total = text(&self.title) + self.subtitle.as_ref().map_or(0, text);
        total += self.paragraphs.iter().map(text).sum::<usize>();
        if let Some(t) = &self.table {
            total += t.columns.iter().map(text).sum::<usize>();
            total += t
                .rows
                .iter()
                .map(|r| r.iter().map(|c| c.len()).sum::<usize>() + r.capacity() * STRING + 24)
                .sum::<usize>();
        }
        total
    }
}

/// Reads a stored spec (JSON of [`DocumentSpec`]) and checks what the layout relies on: a table
/// has columns and no row is wider than the header. Limits are not checked again: they were
/// checked when the job was accepted, and may have changed since.
pub(super) fn decode_stored(spec: &[u8]) -> Result<DocumentSpec, String> {
    let doc: DocumentSpec =
        serde_json::from_slice(spec).map_err(|e| format!("stored PDF spec: not a valid document: {e}"))?;
    if let Some(table) = &doc.table {
        if table.columns.is_empty() {
            return Err("stored PDF spec: the table has no columns".into());
        }
        if let Some(r) = table.rows.iter().position(|row| row.len() > table.columns.len()) {
            return Err(format!(
                "stored PDF spec: table row {r} has {} cells, but the table has {} columns",
                table.rows[r].len(),
                table.columns.len()
            ));
        }
    }
    Ok(doc)
}

fn parse_table(t: TableRequest, limits: &SpecLimits) -> Result<Table, SpecError> {
    let t_rows = t.rows.unwrap_or_default();
    if t.columns.is_empty() {
        return Err(invalid("invalid_field", "table.columns: a table needs at least one column".into()));
    }
    if t.columns.len() > limits.max_columns {
        return Err(invalid(
            "too_many_columns",
            format!("table.columns: {} columns, the limit is {}", t.columns.len(), limits.max_columns),
        ));
    }
    if t_rows.len() > limits.max_rows {
        return Err(invalid(
            "too_many_rows",
            format!("table.rows: {} rows, the limit is {}", t_rows.len(), limits.max_rows),
        ));
    }
    let width = t.columns.len();
    // The field name is only formatted for an error: a table has thousands of cells.
    let cell = |field: &dyn Fn() -> String, c: Cell| -> Result<String, SpecError> {
        let text = c.into_text();
        if text.len() > limits.max_cell_chars {
            check_len(&field(), &text, limits.max_cell_chars, "cell_too_long")?;
        }
        Ok(clean_line(text))
    };
    let columns = t
        .columns
        .into_iter()
        .enumerate()
        .map(|(i, c)| cell(&|| format!("table.columns[{i}]"), c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rows = Vec::with_capacity(t_rows.len());
    for (r, row) in t_rows.into_iter().enumerate() {
        if row.len() > width {
            return Err(invalid(
                "invalid_field",
                format!("table.rows[{r}]: {} cells, but the table has {width} columns", row.len()),
            ));
        }
        let mut cells = Vec::with_capacity(row.len());
        for (c, value) in row.into_iter().enumerate() {
            cells.push(cell(&|| format!("table.rows[{r}][{c}]"), value)?);
        }
        // Trailing empty cells take no memory: a row of `[]` or `["", "", …]` under 50 columns
        // holds nothing.
        let len = cells.len();
        while cells.last().is_some_and(String::is_empty) {
            cells.pop();
        }
        if cells.len() < len {
            cells.shrink_to_fit();
        }
        rows.push(cells);
    }
    Ok(Table { columns, rows })
}

fn check_len(field: &str, text: &str, limit: usize, code: &'static str) -> Result<(), SpecError> {
    // Bytes bound chars from above: only count chars when the byte length is over the limit.
    if text.len() > limit {
        let chars = text.chars().count();
        if chars > limit {
            return Err(invalid(code, format!("{field}: {chars} characters, the limit is {limit}")));
        }
    }
    Ok(())
}

/// One line of text: control characters (newlines, tabs…) become spaces. Reuses `s` when it
/// has none, as almost every cell.
fn clean_line(s: String) -> String {
    if s.chars().any(char::is_control) {
        s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
    } else {
        s
    }
}

/// A paragraph keeps its line breaks; other control characters become spaces.
fn clean_paragraph(s: &str) -> String {
    s.replace("\r\n", "\n").chars().map(|c| if c.is_control() && c != '\n' { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_BUDGET: RenderBudget = RenderBudget { max_pages: usize::MAX, max_lines: usize::MAX };

    const LIMITS: SpecLimits = SpecLimits { max_rows: 3, max_columns: 2, max_cell_chars: 5, render: NO_BUDGET };

    fn parse(json: serde_json::Value) -> Result<DocumentSpec, SpecError> {
        let req: PdfRequest = serde_json::from_value(json).expect("well-formed request");
        DocumentSpec::parse(req, &LIMITS)
    }

    #[test]
    fn a_full_spec_parses() {
        let spec = parse(serde_json::json!({
            "title": "Report\n", "subtitle": "Q3", "paragraphs": ["a\r\nb\tc"],
            "table": {"columns": ["Item", "Qty"], "rows": [["W", 3], [true], [null, 1.5]]},
            "page_size": "letter"
        }))
        .unwrap();
        assert_eq!(spec.title, "Report ");
        assert_eq!(spec.paragraphs, vec!["a\nb c"]);
        assert_eq!(spec.page_size, PageSize::Letter);
        let table = spec.table.unwrap();
        assert_eq!(table.rows, vec![vec!["W", "3"], vec!["true"], vec!["", "1.5"]]);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (serde_json::json!({"title": "  "}), "invalid_field", "title"),
            (serde_json::json!({"title": "x".repeat(501)}), "text_too_long", "title"),
            (serde_json::json!({"title": "t", "page_size": "A3"}), "invalid_field", "page_size"),
            (serde_json::json!({"title": "t", "table": {"columns": []}}), "invalid_field", "table.columns"),
            (
                serde_json::json!({"title": "t", "table": {"columns": ["a", "b", "c"]}}),
                "too_many_columns",
                "table.columns",
            ),
            (
                serde_json::json!({"title": "t", "table": {"columns": ["a"], "rows": [[1], [2], [3], [4]]}}),
                "too_many_rows",
                "table.rows",
            ),
            (
                serde_json::json!({"title": "t", "table": {"columns": ["a"], "rows": [["123456"]]}}),
                "cell_too_long",
                "table.rows[0][0]",
            ),
            (serde_json::json!({"title": "t", "table": {"columns": ["abcdef"]}}), "cell_too_long", "table.columns[0]"),
            (
                serde_json::json!({"title": "t", "table": {"columns": ["a"], "rows": [[1, 2]]}}),
                "invalid_field",
                "table.rows[0]",
            ),
        ];
        for (json, code, field) in cases {
            let err = parse(json.clone()).expect_err(&json.to_string());
            assert_eq!(err.code, code, "{json}");
            assert!(err.message.starts_with(field), "{json}: {}", err.message);
        }
    }

    #[test]
    fn cells_of_every_json_type_become_text_and_others_are_refused() {
        let cases = [
            ("\"Widget\"", Some("Widget")),
            ("\"tab\\there\"", Some("tab here")),
            ("42", Some("42")),
            ("-7", Some("-7")),
            ("18446744073709551615", Some("18446744073709551615")),
            ("1.5", Some("1.5")),
            ("2e3", Some("2000.0")),
            ("true", Some("true")),
            ("null", Some("")),
            ("{\"nested\": true}", None),
            ("[1]", None),
        ];
        for (cell, want) in cases {
            let json = format!("{{\"columns\": [\"a\"], \"rows\": [[{cell}]]}}");
            let table: Result<TableRequest, _> = serde_json::from_str(&json);
            match (table, want) {
                (Ok(t), Some(text)) => {
                    let limits = SpecLimits { max_rows: 10, max_columns: 10, max_cell_chars: 100, render: NO_BUDGET };
                    // An empty last cell is not stored (missing cells are empty).
                    let want: Vec<&str> = [text].into_iter().filter(|t| !t.is_empty()).collect();
                    assert_eq!(parse_table(t, &limits).unwrap().rows, vec![want], "{cell}");
                }
                (Err(e), None) => assert!(e.to_string().contains("table cell"), "{cell}: {e}"),
                (got, want) => panic!("{cell}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn cell_limits_count_characters_not_bytes() {
        let ok = parse(serde_json::json!({"title": "t", "table": {"columns": ["ü€ü€ü"]}}));
        assert!(ok.is_ok(), "5 characters in 11 bytes is within a 5-character limit");
    }

    fn round_trip(spec: &DocumentSpec) -> DocumentSpec {
        use crate::kind::Kind;
        let kind = crate::kinds::pdf::PdfKind::new(RenderBudget { max_pages: 1, max_lines: 1 });
        let record = kind.encode(spec);
        assert_eq!(record.data, None, "a PDF has no bulk data");
        assert!(!record.spec.contains(&b'\n'), "compact JSON");
        kind.decode(record).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_spec_with_every_field_set_round_trips() {
        let spec = DocumentSpec {
            title: "Report \"Q3\" ü€".into(),
            subtitle: Some("Sub".into()),
            paragraphs: vec!["one\ntwo".into(), String::new(), "three".into()],
            table: Some(Table {
                columns: vec!["Item".into(), "Qty".into()],
                rows: vec![vec!["W".into(), "3".into()], vec![String::new(), "1.5".into()]],
            }),
            page_size: PageSize::Letter,
            #[cfg(feature = "test-hooks")]
            test_hook: None,
        };
        assert_eq!(round_trip(&spec), spec);
        let plain = DocumentSpec::titled("t");
        assert_eq!(round_trip(&plain), plain);
    }

    /// The stored form is what a store keeps across upgrades: changing it needs a migration.
    #[test]
    fn the_stored_form_is_stable_and_ignores_unknown_keys() {
        let kind = crate::kinds::pdf::PdfKind::new(RenderBudget { max_pages: 1, max_lines: 1 });
        let record = crate::kind::Kind::encode(&kind, &DocumentSpec::titled("t"));
        assert_eq!(
            std::str::from_utf8(&record.spec).unwrap(),
            r#"{"title":"t","subtitle":null,"paragraphs":[],"table":null,"page_size":"a4"}"#
        );
        let older = br#"{"title":"t","page_size":"letter","added_later":{"x":1}}"#;
        let spec = decode_stored(older).unwrap();
        assert_eq!((spec.page_size, spec.subtitle, spec.paragraphs.len()), (PageSize::Letter, None, 0));
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn test_hooks_round_trip() {
        for hook in [TestHook::Panic, TestHook::Hang, TestHook::SlowPages { millis: 25 }, TestHook::Abort] {
            let spec = DocumentSpec { test_hook: Some(hook), ..DocumentSpec::titled("t") };
            assert_eq!(round_trip(&spec), spec);
        }
        let req: PdfRequest = serde_json::from_str(r#"{"title": "t", "test_hook": "abort"}"#).unwrap();
        assert_eq!(req.test_hook, Some(TestHook::Abort), "clients ask for it as \"abort\"");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_value::<PdfRequest>(serde_json::json!({"title": "t", "paragrahs": []}));
        assert!(err.unwrap_err().to_string().contains("paragrahs"));
    }
}
