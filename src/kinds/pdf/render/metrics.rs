//! Advance widths of the two standard PDF fonts we draw with, in 1/1000 em, so text can be
//! wrapped and columns sized without loading a font program. Values are the published Adobe
//! font metrics for Helvetica and Helvetica-Bold, printable ASCII 0x20..=0x7E.

/// Which of the two fonts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Face {
    Regular,
    Bold,
}

#[rustfmt::skip]
const REGULAR: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, // space ! " # $ % & ' ( ) * + , - . /
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, // 0-9 : ; < = > ?
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, // @ A-O
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, // P-Z [ \ ] ^ _
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, // ` a-o
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584,      // p-z { | } ~
];

#[rustfmt::skip]
const BOLD: [u16; 95] = [
    278, 333, 474, 556, 556, 889, 722, 238, 333, 333, 389, 584, 278, 333, 278, 278,
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 333, 333, 584, 584, 584, 611,
    975, 722, 722, 722, 722, 667, 611, 778, 722, 278, 556, 722, 611, 833, 722, 778,
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 333, 278, 333, 584, 556,
    333, 556, 611, 556, 611, 556, 333, 611, 611, 278, 278, 556, 278, 889, 611, 611,
    611, 611, 389, 556, 333, 611, 556, 778, 556, 556, 500, 389, 280, 389, 584,
];

/// Width used for characters outside ASCII: a little wider than most Latin-1 letters, so
/// wrapping errs on the side of shorter lines.
const OTHER: [u16; 2] = [667, 722];

pub fn char_width(c: char, face: Face) -> u16 {
    let table = match face {
        Face::Regular => &REGULAR,
        Face::Bold => &BOLD,
    };
    match c {
        ' '..='~' => table[c as usize - 0x20],
        _ => OTHER[face as usize],
    }
}

/// Width of `text` in points at `size`.
pub fn text_width(text: &str, face: Face, size: f32) -> f32 {
    let units: u32 = text.chars().map(|c| u32::from(char_width(c, face))).sum();
    units as f32 * size / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_match_known_metrics() {
        assert_eq!(char_width(' ', Face::Regular), 278);
        assert_eq!(char_width('W', Face::Regular), 944);
        assert_eq!(char_width('i', Face::Regular), 222);
        assert_eq!(char_width('~', Face::Bold), 584);
        assert_eq!(char_width('m', Face::Bold), 889);
        assert!((text_width("00", Face::Regular, 10.0) - 11.12).abs() < 1e-4);
    }
}
