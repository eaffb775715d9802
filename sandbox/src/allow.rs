//! An allow list: the system calls a thread may make, some only with given argument
//! values. It compiles to a seccomp BPF program (anything else traps: SIGSYS) and prints in
//! the JSON format of `--seccomp-filter`, so the built-in filters are the documentation of
//! that format too.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::syscalls::NAMES;

/// Errors compiling an allow list.
#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    /// seccompiler refused a condition, rule or filter.
    #[error("cannot compile the seccomp filter")]
    Backend(#[source] seccompiler::BackendError),
}

/// One argument check: `arg[index] == value` (32-bit or 64-bit compare), or
/// `arg[index] & mask == value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond {
    index: u8,
    qword: bool,
    mask: Option<u64>,
    value: u64,
}

impl Cond {
    /// The low 32 bits of argument `index` equal `value` (the kernel reads an `int` or
    /// `unsigned int` there: ioctl requests, fcntl commands, socket domains, signals).
    pub const fn eq32(index: u8, value: u64) -> Cond {
        Cond {
            index,
            qword: false,
            mask: None,
            value,
        }
    }

    /// All 64 bits of argument `index` equal `value`.
    pub const fn eq64(index: u8, value: u64) -> Cond {
        Cond {
            index,
            qword: true,
            mask: None,
            value,
        }
    }

    /// The 64-bit argument `index`, masked with `mask`, equals `value`.
    pub const fn masked(index: u8, mask: u64, value: u64) -> Cond {
        Cond {
            index,
            qword: true,
            mask: Some(mask),
            value,
        }
    }

    fn compile(&self) -> Result<SeccompCondition, AllowError> {
        let len = if self.qword {
            SeccompCmpArgLen::Qword
        } else {
            SeccompCmpArgLen::Dword
        };
        let op = match self.mask {
            Some(m) => SeccompCmpOp::MaskedEq(m),
            None => SeccompCmpOp::Eq,
        };
        SeccompCondition::new(self.index, len, op, self.value).map_err(AllowError::Backend)
    }

    fn json(&self) -> String {
        let op = match self.mask {
            Some(m) => format!("{{\"masked_eq\": {m}}}"),
            None => "\"eq\"".to_string(),
        };
        format!(
            "{{\"index\": {}, \"type\": \"{}\", \"op\": {op}, \"val\": {}}}",
            self.index,
            if self.qword { "qword" } else { "dword" },
            self.value
        )
    }
}

/// What an allow list says of one system call.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// Any arguments.
    Any,
    /// Only when one of these sets of conditions holds (each set and-bound).
    When(Vec<Vec<Cond>>),
}

/// The system calls a thread kind may make.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    rules: BTreeMap<i64, Rule>,
}

impl AllowList {
    /// Nothing allowed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows each of `nrs` with any arguments.
    pub fn any(mut self, nrs: &[libc::c_long]) -> Self {
        for &nr in nrs {
            self.rules.insert(nr, Rule::Any);
        }
        self
    }

    /// Allows `nr` when all of `conds` hold (in addition to what it already allows).
    pub fn when(mut self, nr: libc::c_long, conds: &[Cond]) -> Self {
        match self
            .rules
            .entry(nr)
            .or_insert_with(|| Rule::When(Vec::new()))
        {
            Rule::Any => {}
            Rule::When(sets) => sets.push(conds.to_vec()),
        }
        self
    }

    /// Allows `nr` when argument `index`'s low 32 bits are one of `values`.
    pub fn when_one_of(mut self, nr: libc::c_long, index: u8, values: &[u64]) -> Self {
        for &v in values {
            self = self.when(nr, &[Cond::eq32(index, v)]);
        }
        self
    }

    /// Everything either list allows: the filter of a thread whose children (threads it
    /// starts, processes it forks) install narrower ones of their own, since a thread keeps
    /// its parent's filter and every filter must allow a call.
    pub fn union(mut self, other: &AllowList) -> Self {
        for (&nr, rule) in &other.rules {
            match (self.rules.get_mut(&nr), rule) {
                (None, r) => {
                    self.rules.insert(nr, r.clone());
                }
                (Some(Rule::Any), _) => {}
                (Some(mine), Rule::Any) => *mine = Rule::Any,
                (Some(Rule::When(mine)), Rule::When(theirs)) => {
                    for set in theirs {
                        if !mine.contains(set) {
                            mine.push(set.clone());
                        }
                    }
                }
            }
        }
        self
    }

    /// How many system calls it allows (with any or with some arguments).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether it allows nothing.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether it allows `nr` with some arguments.
    pub fn mentions(&self, nr: libc::c_long) -> bool {
        self.rules.contains_key(&nr)
    }

    /// The BPF program: the listed calls are allowed, any other call traps (SIGSYS).
    pub fn compile(&self) -> Result<BpfProgram, AllowError> {
        let mut rules = BTreeMap::new();
        for (&nr, rule) in &self.rules {
            let compiled = match rule {
                Rule::Any => Vec::new(),
                Rule::When(sets) => sets
                    .iter()
                    .map(|set| {
                        let conds = set.iter().map(Cond::compile).collect::<Result<_, _>>()?;
                        SeccompRule::new(conds).map_err(AllowError::Backend)
                    })
                    .collect::<Result<Vec<_>, AllowError>>()?,
            };
            rules.insert(nr, compiled);
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(AllowError::Backend)?;
        filter.try_into().map_err(AllowError::Backend)
    }

    /// The list as one filter of the JSON format (seccompiler's), indented by `indent`.
    pub fn to_json(&self, indent: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{{");
        let _ = writeln!(s, "{indent}  \"mismatch_action\": \"trap\",");
        let _ = writeln!(s, "{indent}  \"match_action\": \"allow\",");
        let _ = writeln!(s, "{indent}  \"filter\": [");
        let mut entries = Vec::new();
        for (&nr, rule) in &self.rules {
            let name = usize::try_from(nr)
                .ok()
                .and_then(|i| NAMES.get(i))
                .copied()
                .unwrap_or("");
            match rule {
                Rule::Any => entries.push(format!("{indent}    {{\"syscall\": \"{name}\"}}")),
                Rule::When(sets) => {
                    for set in sets {
                        let args: Vec<String> = set.iter().map(Cond::json).collect();
                        entries.push(format!(
                            "{indent}    {{\"syscall\": \"{name}\", \"args\": [{}]}}",
                            args.join(", ")
                        ));
                    }
                }
            }
        }
        let _ = writeln!(s, "{}", entries.join(",\n"));
        let _ = write!(s, "{indent}  ]\n{indent}}}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_keeps_any_and_merges_conditions() {
        let a = AllowList::new()
            .any(&[libc::SYS_read])
            .when(libc::SYS_ioctl, &[Cond::eq32(1, 1)]);
        let b = AllowList::new()
            .when(libc::SYS_read, &[Cond::eq32(0, 3)])
            .when(libc::SYS_ioctl, &[Cond::eq32(1, 2)])
            .when(libc::SYS_ioctl, &[Cond::eq32(1, 1)])
            .any(&[libc::SYS_write]);
        let u = a.union(&b);
        assert_eq!(u.len(), 3);
        assert_eq!(u.rules[&libc::SYS_read], Rule::Any);
        assert_eq!(
            u.rules[&libc::SYS_ioctl],
            Rule::When(vec![vec![Cond::eq32(1, 1)], vec![Cond::eq32(1, 2)]])
        );
    }

    #[test]
    fn json_round_trips_through_seccompiler() {
        let list = AllowList::new()
            .any(&[libc::SYS_read, libc::SYS_write])
            .when(libc::SYS_ioctl, &[Cond::eq32(1, 0xae80)])
            .when(libc::SYS_mmap, &[Cond::masked(2, 4, 0)]);
        let json = format!("{{\"t\": {}}}", list.to_json(""));
        let map = seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64)
            .expect("seccompiler reads what to_json writes");
        assert_eq!(map["t"], list.compile().expect("compiles"));
    }
}
