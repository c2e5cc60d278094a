//! The chain of images, base to top.
