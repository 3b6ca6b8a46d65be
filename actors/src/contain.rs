//! Containing panics of user code the engine calls outside a handler.
//!
//! Besides the handler, the engine runs user code of its own accord: the
//! `Clone` of an input kept for a retry, the `Drop` of that copy, of an
//! output it has no more use for (the last stage's), of an item cancelled on
//! abort or of a late result given up at the timeout, the `Display` of a
//! handler's error, and the `Drop` of a panic's payload. Any of them may
//! panic. The rule is the handler's: a panic there must never take down an
//! actor, a worker's thread or the process. So the engine calls such code
//! only through these functions, which catch the panic, and
//!
//! - a result the handler returned stands (a panicking `Drop` of what the
//!   engine drops afterwards is logged at ERROR, the item keeps its
//!   outcome);
//! - an item whose data cannot be copied fails `Panicked`, without a retry
//!   (there is no copy to retry with), and nothing else does;
//! - a panic payload whose own `Drop` panics is dropped once more under a
//!   guard, and if that panics too it is leaked (`mem::forget`) rather than
//!   unwinding any further.
//!
//! A `Drop` that panics while another panic unwinds still aborts the
//! process: Rust allows no way around that.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Drops a panic payload, whose `Drop` is user code too: a panic in it is
/// caught, and that panic's payload is leaked rather than dropped.
pub(crate) fn drop_payload(payload: Box<dyn Any + Send>) {
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

/// The text of a panic payload, which is then dropped ([`drop_payload`]).
pub(crate) fn take_message(payload: Box<dyn Any + Send>) -> String {
    let message = panic_message(&*payload);
    drop_payload(payload);
    message
}

/// Drops `value`, whose `Drop` may be user code; `Err` has the message of
/// its panic.
#[inline]
pub(crate) fn drop_caught<T>(value: T) -> Result<(), String> {
    if !std::mem::needs_drop::<T>() {
        return Ok(());
    }
    catch_unwind(AssertUnwindSafe(move || drop(value))).map_err(take_message)
}

/// Drops `value` like [`drop_caught`], logging a panic at ERROR with what
/// was dropped (`what`, e.g. "the output of item 7 in stage `store`").
#[inline]
pub(crate) fn drop_logged<T>(value: T, what: impl FnOnce() -> String) {
    if let Err(message) = drop_caught(value) {
        tracing::error!(target: "bergtalzug::item",
            "dropping {} panicked: {message}; the panic was contained",
            what()
        );
    }
}

/// Calls `f`, user code that must not unwind into the engine; `Err` has
/// the message of its panic.
#[inline]
pub(crate) fn call<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(take_message)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("bomb");
        }
    }

    /// A payload whose `Drop` panics with a payload whose `Drop` panics.
    struct Nested;
    impl Drop for Nested {
        fn drop(&mut self) {
            std::panic::panic_any(Nested2);
        }
    }
    struct Nested2;
    impl Drop for Nested2 {
        fn drop(&mut self) {
            std::panic::panic_any(Bomb);
        }
    }

    #[test]
    fn a_panicking_drop_is_caught_with_its_message() {
        assert_eq!(drop_caught(Bomb), Err("bomb".to_string()));
        assert_eq!(drop_caught(5u64), Ok(()));
    }

    #[test]
    fn a_payload_whose_drop_panics_again_and_again_is_contained() {
        drop_payload(Box::new(Nested));
        assert!(call(|| std::panic::panic_any(Nested)).is_err());
    }
}
