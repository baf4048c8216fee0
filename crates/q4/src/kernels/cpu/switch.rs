//! On / off switches of CPU kernel paths: on by default, off for the whole process when the
//! path's environment variable is `0`, or by [`Switch::set`] (same-process A/B runs, tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub struct Switch {
    env: &'static str,
    enabled: AtomicBool,
    env_off: OnceLock<bool>,
}

impl Switch {
    /// A switch that `env=0` turns off.
    pub const fn new(env: &'static str) -> Switch {
        Switch {
            env,
            enabled: AtomicBool::new(true),
            env_off: OnceLock::new(),
        }
    }

    /// Neither turned off by its environment variable (read once) nor by [`Switch::set`].
    #[inline]
    pub fn on(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
            && !*self
                .env_off
                .get_or_init(|| turned_off(std::env::var_os(self.env)))
    }

    pub fn set(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }
}

/// Whether an environment variable's value turns a path off: exactly `0`.
fn turned_off(value: Option<std::ffi::OsString>) -> bool {
    value.is_some_and(|v| v == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_turns_it_off_and_on() {
        static S: Switch = Switch::new("Q4_TEST_SWITCH_NEVER_SET");
        assert!(S.on());
        S.set(false);
        assert!(!S.on());
        S.set(true);
        assert!(S.on());
    }

    #[test]
    fn only_zero_in_the_environment_turns_it_off() {
        assert!(turned_off(Some("0".into())));
        for on in [None, Some("1".into()), Some("".into()), Some("00".into())] {
            assert!(!turned_off(on));
        }
    }
}
