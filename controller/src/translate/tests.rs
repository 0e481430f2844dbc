//! Golden translation tests.
