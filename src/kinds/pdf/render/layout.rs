//! Page layout of a [`DocumentSpec`]: where every piece of text, fill and rule goes, page by page.
//!
//! Pure computation (no printpdf types), so pagination is unit-tested directly. Coordinates are
//! PDF points measured from the page's top-left corner; the renderer flips them.

use super::metrics::{text_width, Face};
use crate::kinds::pdf::spec::{DocumentSpec, PageSize, RenderBudget, Table};

/// Something to draw.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Text { x: f32, baseline: f32, face: Face, size: f32, gray: f32, text: String },
    Fill { x: f32, top: f32, width: f32, height: f32, gray: f32 },
    Rule { x1: f32, y1: f32, x2: f32, y2: f32 },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PageLayout {
    pub items: Vec<Item>,
}

#[derive(Debug)]
pub struct Layout {
    pub width: f32,
    pub height: f32,
    pub pages: Vec<PageLayout>,
}

#[derive(Clone, Copy)]
struct Style {
    face: Face,
    size: f32,
    line_height: f32,
    gray: f32,
}

const MARGIN: f32 = 40.0;
const FOOTER: f32 = 24.0;
const TITLE: Style = Style { face: Face::Bold, size: 20.0, line_height: 25.0, gray: 0.0 };
const SUBTITLE: Style = Style { face: Face::Regular, size: 12.5, line_height: 16.0, gray: 0.35 };
const BODY: Style = Style { face: Face::Regular, size: 10.0, line_height: 14.0, gray: 0.0 };
const HEADER: Style = Style { face: Face::Bold, size: 9.0, line_height: 11.0, gray: 0.0 };
const CELL: Style = Style { face: Face::Regular, size: 9.0, line_height: 11.0, gray: 0.0 };
const FOOTER_STYLE: Style = Style { face: Face::Regular, size: 8.0, line_height: 10.0, gray: 0.4 };
const CELL_PAD_X: f32 = 4.0;
const CELL_PAD_Y: f32 = 3.0;
const HEADER_FILL: f32 = 0.88;
/// Rows laid out between two calls of the caller's checkpoint.
const ROWS_PER_CHECK: usize = 512;

/// Lays out `spec`; `checkpoint` is called now and then so a cancelled job stops early.
/// Why a layout stopped before its end.
#[derive(Debug, PartialEq)]
pub enum Stop<E> {
    /// The checkpoint said so (cancel, timeout, shutdown).
    Checkpoint(E),
    /// The document renders to more than the budget allows; the message says which limit.
    TooLarge(String),
}

/// The budget ran out (carried up to [`Stop::TooLarge`]).
#[derive(Debug)]
struct OverBudget(String);

impl<E> From<OverBudget> for Stop<E> {
    fn from(o: OverBudget) -> Self {
        Stop::TooLarge(o.0)
    }
}

/// Lays `spec` out within `budget`, calling `checkpoint` every few hundred rows or lines.
pub fn layout<E>(
    spec: &DocumentSpec,
    budget: RenderBudget,
    mut checkpoint: impl FnMut() -> Result<(), E>,
) -> Result<Layout, Stop<E>> {
    let (width, height) = spec.page_size.points();
    let mut w = Writer::new(width, height, budget);
    let mut check = || checkpoint().map_err(Stop::Checkpoint);
    w.text_block(&spec.title, TITLE, 6.0, &mut check)?;
    if let Some(subtitle) = &spec.subtitle {
        w.text_block(subtitle, SUBTITLE, 8.0, &mut check)?;
    }
    w.y += 6.0;
    for paragraph in &spec.paragraphs {
        w.text_block(paragraph, BODY, 8.0, &mut check)?;
    }
    if let Some(table) = &spec.table {
        check()?;
        w.table(table, &mut check)?;
    }
    let mut pages = w.finish();
    let count = pages.len();
    for (i, page) in pages.iter_mut().enumerate() {
        let text = format!("Page {} of {count}", i + 1);
        let x = (width - text_width(&text, FOOTER_STYLE.face, FOOTER_STYLE.size)) / 2.0;
        page.items.push(text_item(x, height - FOOTER, FOOTER_STYLE, text));
    }
    Ok(Layout { width, height, pages })
}

/// What a document renders to at least, cheap enough to compute at submit (one pass over the
/// text, no wrapping): (pages, lines of text). Every row and every line of a paragraph takes at
/// least its height, and every non-blank cell, header cell and paragraph line is at least one
/// line of text (header cells once per page).
pub fn at_least(spec: &DocumentSpec) -> (usize, usize) {
    let blank = |t: &str| t.trim().is_empty();
    let hard_lines = |t: &str| t.split('\n').filter(|l| !blank(l)).count();
    let mut lines = usize::from(!blank(&spec.title)) + spec.subtitle.as_deref().map_or(0, |s| usize::from(!blank(s)));
    let mut height = TITLE.line_height + spec.subtitle.as_ref().map_or(0.0, |_| SUBTITLE.line_height);
    for p in &spec.paragraphs {
        lines += hard_lines(p);
        height += (p.bytes().filter(|&b| b == b'\n').count() + 1) as f32 * BODY.line_height;
    }
    let page = content_height(spec.page_size);
    if let Some(t) = &spec.table {
        let table_height = (t.rows.len() + 1) as f32 * (CELL.line_height + 2.0 * CELL_PAD_Y);
        // The header is repeated on every page the table covers: at least this many.
        let table_pages = ((table_height / page).ceil() as usize).max(1);
        let header_cells = t.columns.iter().filter(|c| !blank(c)).count();
        lines += t.rows.iter().flatten().filter(|c| !blank(c)).count() + header_cells * table_pages;
        height += table_height;
    }
    let pages = ((height / page).ceil() as usize).max(1);
    (pages, lines)
}

/// Refuses a document that cannot fit `budget` (see [`at_least`]), naming the limit.
pub fn check_budget(spec: &DocumentSpec, budget: RenderBudget) -> Result<(), String> {
    let (pages, lines) = at_least(spec);
    if pages > budget.max_pages {
        return Err(format!("the document needs at least {pages} pages; the limit is {}", budget.max_pages));
    }
    if lines > budget.max_lines {
        return Err(format!("the document needs at least {lines} lines of text; the limit is {}", budget.max_lines));
    }
    Ok(())
}

/// Height available for content on one page.
fn content_height(size: PageSize) -> f32 {
    let (_, height) = size.points();
    height - 2.0 * MARGIN - FOOTER / 2.0
}

fn text_item(x: f32, baseline: f32, s: Style, text: String) -> Item {
    Item::Text { x, baseline, face: s.face, size: s.size, gray: s.gray, text }
}

/// Where the baseline of a line of `s` sits inside its line box starting at `top`.
fn baseline(top: f32, s: Style) -> f32 {
    top + (s.line_height - s.size) / 2.0 + s.size * 0.78
}

struct Writer {
    width: f32,
    top: f32,
    bottom: f32,
    /// Current vertical position on the current page.
    y: f32,
    pages: Vec<PageLayout>,
    page: PageLayout,
    budget: RenderBudget,
    /// Lines of text placed so far (footers not counted: the page limit bounds them).
    lines: usize,
}

impl Writer {
    fn new(width: f32, height: f32, budget: RenderBudget) -> Self {
        Writer {
            width,
            top: MARGIN,
            bottom: height - MARGIN - FOOTER / 2.0,
            y: MARGIN,
            pages: Vec::new(),
            page: PageLayout::default(),
            budget,
            lines: 0,
        }
    }

    fn content_width(&self) -> f32 {
        self.width - 2.0 * MARGIN
    }

    fn new_page(&mut self) -> Result<(), OverBudget> {
        if self.pages.len() + 2 > self.budget.max_pages {
            let max = self.budget.max_pages;
            return Err(OverBudget(format!("the document renders to more than {max} pages, the limit")));
        }
        self.pages.push(std::mem::take(&mut self.page));
        self.y = self.top;
        Ok(())
    }

    /// Starts a new page unless `height` still fits (or the page is empty anyway).
    fn ensure(&mut self, height: f32) -> Result<(), OverBudget> {
        if self.y + height > self.bottom && self.y > self.top {
            self.new_page()?;
        }
        Ok(())
    }

    /// Places a line of text; a blank one takes its space but draws nothing.
    fn text(&mut self, x: f32, baseline: f32, s: Style, text: String) -> Result<(), OverBudget> {
        if text.trim().is_empty() {
            return Ok(());
        }
        self.lines += 1;
        if self.lines > self.budget.max_lines {
            let max = self.budget.max_lines;
            return Err(OverBudget(format!("the document renders to more than {max} lines of text, the limit")));
        }
        self.page.items.push(text_item(x, baseline, s, text));
        Ok(())
    }

    fn text_block<E>(
        &mut self,
        text: &str,
        s: Style,
        space_after: f32,
        checkpoint: &mut impl FnMut() -> Result<(), Stop<E>>,
    ) -> Result<(), Stop<E>> {
        for (n, line) in wrap(text, s.face, s.size, self.content_width()).into_iter().enumerate() {
            if n % ROWS_PER_CHECK == ROWS_PER_CHECK - 1 {
                checkpoint()?;
            }
            self.ensure(s.line_height)?;
            self.text(MARGIN, baseline(self.y, s), s, line)?;
            self.y += s.line_height;
        }
        self.y += space_after;
        Ok(())
    }

    fn table<E>(&mut self, table: &Table, checkpoint: &mut impl FnMut() -> Result<(), Stop<E>>) -> Result<(), Stop<E>> {
        let widths = column_widths(table, self.content_width());
        let mut xs = Vec::with_capacity(widths.len() + 1);
        xs.push(MARGIN);
        for w in &widths {
            xs.push(xs[xs.len() - 1] + w);
        }
        let header: Vec<Vec<String>> = table
            .columns
            .iter()
            .zip(&widths)
            .map(|(c, w)| wrap(c, HEADER.face, HEADER.size, w - 2.0 * CELL_PAD_X))
            .collect();
        let header_lines = header.iter().map(Vec::len).max().unwrap_or(1);
        let header_h = header_lines as f32 * HEADER.line_height + 2.0 * CELL_PAD_Y;
        let max_row_lines =
            (((self.bottom - self.top - header_h) - 2.0 * CELL_PAD_Y) / CELL.line_height).floor().max(1.0) as usize;

        let mut block_top = None;
        let first_row_h = table.rows.first().map_or(0.0, |_| CELL.line_height + 2.0 * CELL_PAD_Y);
        self.ensure(header_h + first_row_h)?;
        self.table_header(&header, &xs, header_h, &mut block_top)?;
        for (i, row) in table.rows.iter().enumerate() {
            if i % ROWS_PER_CHECK == ROWS_PER_CHECK - 1 {
                checkpoint()?;
            }
            let mut cells: Vec<Vec<String>> =
                row.iter().zip(&widths).map(|(c, w)| wrap(c, CELL.face, CELL.size, w - 2.0 * CELL_PAD_X)).collect();
            for lines in &mut cells {
                truncate_lines(lines, max_row_lines);
            }
            let lines = cells.iter().map(Vec::len).max().unwrap_or(1);
            let row_h = lines as f32 * CELL.line_height + 2.0 * CELL_PAD_Y;
            if self.y + row_h > self.bottom {
                self.close_table_block(&xs, &mut block_top);
                self.new_page()?;
                self.table_header(&header, &xs, header_h, &mut block_top)?;
            }
            for (col, lines) in cells.iter().enumerate() {
                let numeric = row[col].trim().parse::<f64>().is_ok();
                for (n, line) in lines.iter().enumerate() {
                    let x = if numeric {
                        xs[col + 1] - CELL_PAD_X - text_width(line, CELL.face, CELL.size)
                    } else {
                        xs[col] + CELL_PAD_X
                    };
                    let top = self.y + CELL_PAD_Y + n as f32 * CELL.line_height;
                    self.text(x, baseline(top, CELL), CELL, line.clone())?;
                }
            }
            self.y += row_h;
            self.rule(xs[0], xs[xs.len() - 1], self.y);
        }
        self.close_table_block(&xs, &mut block_top);
        self.y += 8.0;
        Ok(())
    }

    fn table_header(
        &mut self,
        header: &[Vec<String>],
        xs: &[f32],
        height: f32,
        block_top: &mut Option<f32>,
    ) -> Result<(), OverBudget> {
        let (left, right) = (xs[0], xs[xs.len() - 1]);
        *block_top = Some(self.y);
        self.page.items.push(Item::Fill { x: left, top: self.y, width: right - left, height, gray: HEADER_FILL });
        for (col, lines) in header.iter().enumerate() {
            for (n, line) in lines.iter().enumerate() {
                let top = self.y + CELL_PAD_Y + n as f32 * HEADER.line_height;
                self.text(xs[col] + CELL_PAD_X, baseline(top, HEADER), HEADER, line.clone())?;
            }
        }
        self.rule(left, right, self.y);
        self.y += height;
        self.rule(left, right, self.y);
        Ok(())
    }

    /// Draws the vertical rules of the part of the table on this page.
    fn close_table_block(&mut self, xs: &[f32], block_top: &mut Option<f32>) {
        if let Some(top) = block_top.take() {
            for &x in xs {
                self.page.items.push(Item::Rule { x1: x, y1: top, x2: x, y2: self.y });
            }
        }
    }

    fn rule(&mut self, x1: f32, x2: f32, y: f32) {
        self.page.items.push(Item::Rule { x1, y1: y, x2, y2: y });
    }

    fn finish(mut self) -> Vec<PageLayout> {
        self.pages.push(self.page);
        self.pages
    }
}

/// Column widths filling `available`: narrow columns get their natural width, wide ones share
/// what is left evenly, and any slack is spread in proportion.
fn column_widths(table: &Table, available: f32) -> Vec<f32> {
    let n = table.columns.len();
    let mut natural: Vec<f32> =
        table.columns.iter().map(|c| text_width(c, HEADER.face, HEADER.size) + 2.0 * CELL_PAD_X).collect();
    for row in &table.rows {
        for (w, cell) in natural.iter_mut().zip(row) {
            // Measure only when the cell could be wider than the column so far (no glyph of
            // ours is wider than 1.02 em, and bytes bound characters from above).
            if cell.len() as f32 * 1.02 * CELL.size + 2.0 * CELL_PAD_X > *w {
                *w = w.max(text_width(cell, CELL.face, CELL.size) + 2.0 * CELL_PAD_X);
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| natural[a].total_cmp(&natural[b]));
    let mut widths = vec![0.0; n];
    let mut remaining = available;
    for (k, &col) in order.iter().enumerate() {
        let share = remaining / (n - k) as f32;
        widths[col] = natural[col].min(share);
        remaining -= widths[col];
    }
    if remaining > 0.0 {
        let total: f32 = widths.iter().sum();
        for w in &mut widths {
            *w += remaining * *w / total;
        }
    }
    widths
}

/// Keeps at most `max` lines, marking the cut with an ellipsis.
fn truncate_lines(lines: &mut Vec<String>, max: usize) {
    if lines.len() > max {
        lines.truncate(max);
        if let Some(last) = lines.last_mut() {
            last.push('\u{2026}');
        }
    }
}

/// Breaks `text` into lines no wider than `max_width` points: at spaces where possible, inside
/// words that are too long on their own, and at every `\n`.
pub fn wrap(text: &str, face: Face, size: f32, max_width: f32) -> Vec<String> {
    let space = text_width(" ", face, size);
    let mut out = Vec::new();
    for hard_line in text.split('\n') {
        let mut line = String::new();
        let mut line_w = 0.0;
        for word in hard_line.split(' ') {
            let word_w = text_width(word, face, size);
            let gap = if line.is_empty() { 0.0 } else { space };
            if line_w + gap + word_w <= max_width {
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(word);
                line_w += gap + word_w;
                continue;
            }
            if !line.is_empty() {
                out.push(std::mem::take(&mut line));
                line_w = 0.0;
            }
            if word_w <= max_width {
                line.push_str(word);
                line_w = word_w;
                continue;
            }
            for c in word.chars() {
                let c_w = text_width(c.encode_utf8(&mut [0; 4]), face, size);
                if line_w + c_w > max_width && !line.is_empty() {
                    out.push(std::mem::take(&mut line));
                    line_w = 0.0;
                }
                line.push(c);
                line_w += c_w;
            }
        }
        out.push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::pdf::spec::{DocumentSpec, PageSize};

    const BUDGET: RenderBudget = RenderBudget { max_pages: usize::MAX, max_lines: usize::MAX };

    fn texts(page: &PageLayout) -> Vec<&str> {
        page.items
            .iter()
            .filter_map(|i| match i {
                Item::Text { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn spec_with_rows(rows: usize) -> DocumentSpec {
        let mut spec = DocumentSpec::titled("Report");
        spec.table = Some(Table {
            columns: vec!["Item".into(), "Qty".into(), "Price".into()],
            rows: (1..=rows).map(|n| vec![format!("Widget {n}"), n.to_string(), format!("{n}.99")]).collect(),
        });
        spec
    }

    #[test]
    fn a_title_a_header_and_40_rows_fit_one_a4_page() {
        // The benchmark document the Python peers draw on one page.
        let mut spec = spec_with_rows(40);
        spec.title = "Benchmark report - page 1/1".into();
        assert_eq!(layout::<()>(&spec, BUDGET, || Ok(())).unwrap().pages.len(), 1);
        assert_eq!(layout::<()>(&spec_with_rows(41 * 2), BUDGET, || Ok(())).unwrap().pages.len(), 2);
    }

    #[test]
    fn a_long_table_spans_pages_with_the_header_on_each() {
        let layout = layout::<()>(&spec_with_rows(300), BUDGET, || Ok(())).unwrap();
        assert!(layout.pages.len() >= 3, "{} pages", layout.pages.len());
        for (i, page) in layout.pages.iter().enumerate() {
            let t = texts(page);
            assert!(t.contains(&"Item") && t.contains(&"Qty"), "header missing on page {}", i + 1);
            assert!(t.contains(&format!("Page {} of {}", i + 1, layout.pages.len()).as_str()));
        }
        let all: Vec<&str> = layout.pages.iter().flat_map(texts).collect();
        for n in 1..=300 {
            assert!(all.contains(&format!("Widget {n}").as_str()), "row {n} missing");
        }
    }

    #[test]
    fn nothing_is_drawn_outside_the_page_margins() {
        let mut spec = spec_with_rows(120);
        spec.page_size = PageSize::Letter;
        spec.paragraphs = vec!["word ".repeat(2000)];
        let layout = layout::<()>(&spec, BUDGET, || Ok(())).unwrap();
        for page in &layout.pages {
            for item in &page.items {
                if let Item::Text { x, baseline, face, size, text, .. } = item {
                    assert!(
                        *x >= MARGIN - 0.01 && x + text_width(text, *face, *size) <= layout.width - MARGIN + 0.01,
                        "{text}"
                    );
                    assert!(*baseline > MARGIN && *baseline < layout.height, "{text}");
                }
            }
        }
    }

    #[test]
    fn wrapping_respects_the_width_and_keeps_every_character() {
        let text = "The quick brown fox jumps over the lazy dog. Supercalifragilisticexpialidocious!\nNext";
        let lines = wrap(text, Face::Regular, 10.0, 80.0);
        assert!(lines.len() > 3);
        for line in &lines {
            assert!(text_width(line, Face::Regular, 10.0) <= 80.0, "{line}");
        }
        assert_eq!(lines.concat().replace(' ', ""), text.replace([' ', '\n'], ""));
        assert_eq!(lines.last().unwrap(), "Next");
    }

    #[test]
    fn a_cell_taller_than_a_page_is_cut_with_an_ellipsis() {
        let mut spec = DocumentSpec::titled("t");
        spec.table = Some(Table { columns: vec!["a".into(); 20], rows: vec![vec!["x ".repeat(500); 20]] });
        let layout = layout::<()>(&spec, BUDGET, || Ok(())).unwrap();
        let all: Vec<&str> = layout.pages.iter().flat_map(texts).collect();
        assert!(all.iter().any(|t| t.ends_with('\u{2026}')));
    }

    #[test]
    fn the_checkpoint_can_stop_a_long_layout() {
        let result = layout(&spec_with_rows(5000), BUDGET, || Err("stop"));
        assert_eq!(result.unwrap_err(), Stop::Checkpoint("stop"));
        let mut spec = DocumentSpec::titled("t");
        spec.paragraphs = vec!["line\n".repeat(5000)];
        assert_eq!(layout(&spec, BUDGET, || Err("stop")).unwrap_err(), Stop::Checkpoint("stop"), "paragraphs too");
    }

    #[test]
    fn blank_cells_and_lines_take_space_but_draw_nothing() {
        let mut spec = DocumentSpec::titled("t");
        spec.paragraphs = vec!["a\n\n   \nb".into()];
        spec.table = Some(Table {
            columns: vec!["A".into(), "B".into(), "C".into()],
            rows: vec![vec![], vec!["".into(), "x".into()]],
        });
        let layout = layout::<()>(&spec, BUDGET, || Ok(())).unwrap();
        let all: Vec<&str> = layout.pages.iter().flat_map(texts).collect();
        assert_eq!(all, vec!["t", "a", "b", "A", "B", "C", "x", "Page 1 of 1"]);
    }

    #[test]
    fn the_budget_stops_the_layout_and_the_floor_never_exceeds_the_real_size() {
        // (spec, pages and lines it really renders)
        let mut paragraphs = DocumentSpec::titled("t");
        paragraphs.paragraphs = vec!["word ".repeat(3000), "\n".repeat(500)];
        let mut empty_rows = DocumentSpec::titled("t");
        empty_rows.table = Some(Table { columns: vec!["c".into(); 50], rows: vec![vec![]; 3000] });
        let mut letter = spec_with_rows(700);
        letter.page_size = PageSize::Letter;
        // Many pages of paragraphs before a wide table: its header repeats only where it runs.
        let mut late_table = DocumentSpec::titled("t");
        late_table.paragraphs = vec!["x\n".repeat(3000)];
        late_table.table = Some(Table { columns: vec!["c".into(); 50], rows: vec![vec!["1".into(); 50]; 100] });
        // (spec, whether the page floor must be close: wrapping is not foreseen, rows are)
        for (spec, close) in [
            (spec_with_rows(40), true),
            (spec_with_rows(2000), true),
            (paragraphs, false),
            (empty_rows, true),
            (late_table, true),
            (letter, true),
        ] {
            let done = layout::<()>(&spec, BUDGET, || Ok(())).unwrap();
            let pages = done.pages.len();
            let lines = done.pages.iter().map(|p| texts(p).len()).sum::<usize>() - pages;
            let (min_pages, min_lines) = at_least(&spec);
            assert!(
                min_pages <= pages && min_lines <= lines,
                "floor ({min_pages}, {min_lines}) > real ({pages}, {lines})"
            );
            assert!(!close || min_pages * 10 >= pages * 8, "the page floor is close: {min_pages} of {pages}");
            let tight = RenderBudget { max_pages: pages - 1, max_lines: usize::MAX };
            if pages > 1 {
                assert!(matches!(layout::<()>(&spec, tight, || Ok(())), Err(Stop::TooLarge(m)) if m.contains("pages")));
            }
            let tight = RenderBudget { max_pages: usize::MAX, max_lines: lines - 1 };
            assert!(matches!(layout::<()>(&spec, tight, || Ok(())), Err(Stop::TooLarge(m)) if m.contains("lines")));
            let exact = RenderBudget { max_pages: pages, max_lines: lines };
            assert!(layout::<()>(&spec, exact, || Ok(())).is_ok(), "the exact budget is enough");
        }
    }
}
