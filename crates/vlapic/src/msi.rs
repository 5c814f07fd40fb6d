//! MSI address/data decoding into interrupt messages.
//! (Issue 3: being built.)
