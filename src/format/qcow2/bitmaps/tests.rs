//! Tests of the bitmap structures: hostile extensions, directories and
//! tables, and the bit arithmetic of recording writes.

use super::*;

fn placeholder() {}
