//! nftables objects as values, and a transaction of operations on them that renders to the text
//! `nft -f -` reads. Pure; nothing here knows about Services.
//!
//! ```text
//!   Table (family ip / ip6, name)
//!     ├─ Set { name, key type, value type (a map when present), flags, timeout, comment }
//!     │    └─ Element { key, value }
//!     └─ Chain { name, base hook (type, hook, priority) or none, comment, rules }
//!   Transaction: [Op] ──render──> "add chain ip ferrolb svc-… { comment \"…\" ; rule ; }\n…"
//! ```
//!
//! Rules stay text (as in knftables): what the renderer needs to know about an object (is it a
//! map, what its key is, which chain it is) is a field of the value, never read back from text.
//! Operations borrow the objects they render, so a large transaction copies no rules.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use super::model::Family;

/// The table name, in both the `ip` and the `ip6` family.
pub const TABLE: &str = "ferrolb";

/// nft's limit on a comment, in bytes (`NFTNL_UDATA_COMMENT_MAXLEN`): one byte more and it
/// refuses the whole transaction ("comment too long").
pub const COMMENT_MAX: usize = 128;

/// The table of one family: `ip ferrolb` or `ip6 ferrolb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// `ip` or `ip6`.
    pub family: Family,
}

impl Table {
    /// The family's keyword, also the payload keyword for addresses (`ip daddr`, `ip6 daddr`).
    pub fn word(self) -> &'static str {
        match self.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The type of one address of the family in a set.
    pub fn addr_type(self) -> DataType {
        match self.family {
            Family::V4 => DataType::Ipv4Addr,
            Family::V6 => DataType::Ipv6Addr,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {TABLE}", self.word())
    }
}

/// A data type of a set's key or a map's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataType {
    Ipv4Addr,
    Ipv6Addr,
    InetProto,
    InetService,
    Verdict,
}

impl DataType {
    fn as_str(self) -> &'static str {
        match self {
            DataType::Ipv4Addr => "ipv4_addr",
            DataType::Ipv6Addr => "ipv6_addr",
            DataType::InetProto => "inet_proto",
            DataType::InetService => "inet_service",
            DataType::Verdict => "verdict",
        }
    }
}

/// A key or value type: concatenated data types (`type a . b`), or the type of an expression
/// (`typeof numgen random mod 1`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Type {
    /// `type t1 . t2 …`
    Of(Vec<DataType>),
    /// `typeof <expression>`
    Typeof(String),
}

impl Type {
    fn keyword(&self) -> &'static str {
        match self {
            Type::Of(_) => "type",
            Type::Typeof(_) => "typeof",
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Of(types) => {
                for (i, t) in types.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" . ")?;
                    }
                    f.write_str(t.as_str())?;
                }
                Ok(())
            }
            Type::Typeof(expr) => f.write_str(expr),
        }
    }
}

/// A set flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SetFlag {
    Interval,
    Dynamic,
    Timeout,
}

impl SetFlag {
    fn as_str(self) -> &'static str {
        match self {
            SetFlag::Interval => "interval",
            SetFlag::Dynamic => "dynamic",
            SetFlag::Timeout => "timeout",
        }
    }
}

/// Whether a set has values (a map) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    Set,
    Map,
}

impl SetKind {
    fn as_str(self) -> &'static str {
        match self {
            SetKind::Set => "set",
            SetKind::Map => "map",
        }
    }
}

/// A named set or map (its elements travel in operations, not in the value).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Set {
    pub name: String,
    /// The key's type.
    pub key: Type,
    /// The value's type: present for a map.
    pub value: Option<Type>,
    pub flags: Vec<SetFlag>,
    /// Default timeout of elements, in seconds.
    pub timeout: Option<u32>,
    /// `auto-merge` (adjacent intervals merged).
    pub auto_merge: bool,
    pub comment: Option<String>,
}

impl Set {
    /// A set of `key` with nothing else.
    pub fn new(name: impl Into<String>, key: Type) -> Self {
        Self { name: name.into(), key, value: None, flags: Vec::new(), timeout: None, auto_merge: false, comment: None }
    }

    /// The same, with a value type: a map.
    pub fn map(mut self, value: Type) -> Self {
        self.value = Some(value);
        self
    }

    /// The same, with a comment.
    pub fn comment(mut self, comment: impl Into<String>) -> Self {
        self.comment = Some(comment.into());
        self
    }

    pub fn kind(&self) -> SetKind {
        if self.value.is_some() { SetKind::Map } else { SetKind::Set }
    }

    /// The specification inside `{ … }`, each part ended by ` ;`.
    fn write_spec(&self, out: &mut String) {
        let _ = write!(out, "{} {}", self.key.keyword(), self.key);
        if let Some(value) = &self.value {
            let _ = write!(out, " : {value}");
        }
        out.push_str(" ;");
        if !self.flags.is_empty() {
            out.push_str(" flags ");
            for (i, flag) in self.flags.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(flag.as_str());
            }
            out.push_str(" ;");
        }
        if let Some(timeout) = self.timeout {
            let _ = write!(out, " timeout {timeout}s ;");
        }
        if self.auto_merge {
            out.push_str(" auto-merge ;");
        }
        if let Some(comment) = &self.comment {
            // Our own words, never a name from the cluster.
            let _ = write!(out, " comment \"{comment}\" ;");
        }
    }
}

/// One element of a set (`key`) or map (`key : value`), both already in nft's syntax.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element<'a> {
    pub key: Cow<'a, str>,
    pub value: Option<Cow<'a, str>>,
}

impl<'a> Element<'a> {
    /// An element of a set.
    pub fn key(key: impl Into<Cow<'a, str>>) -> Self {
        Self { key: key.into(), value: None }
    }

    /// An element of a map.
    pub fn pair(key: impl Into<Cow<'a, str>>, value: impl Into<Cow<'a, str>>) -> Self {
        Self { key: key.into(), value: Some(value.into()) }
    }
}

impl fmt::Display for Element<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} : {v}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// The type of a base chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainType {
    Filter,
    Nat,
}

/// A netfilter hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

/// What makes a chain a base chain: where packets enter it. The policy is always `accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BaseHook {
    pub kind: ChainType,
    pub hook: Hook,
    /// Numeric (dstnat is -100, srcnat 100): nft only takes the names on some hooks.
    pub priority: i32,
}

impl fmt::Display for BaseHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        let hook = match self.hook {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        };
        write!(f, "type {kind} hook {hook} priority {} ; policy accept ;", self.priority)
    }
}

/// A chain and its rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Chain {
    pub name: String,
    /// Present for a base chain.
    pub base: Option<BaseHook>,
    pub comment: Option<String>,
    /// Rules in nft's syntax, without the ending ` ;`.
    pub rules: Vec<String>,
}

/// One command of a transaction. Objects are borrowed or owned, as the caller has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    /// `# text`, after an empty line: only for a human reading the transaction.
    Heading(&'static str),
    /// `add table T` (without comment: only to make a following delete succeed).
    AddTable,
    /// `add table T { comment … ; }`
    AddTableWithComment,
    /// `create table T { comment … ; }`: fails where the table exists.
    CreateTable,
    DeleteTable,
    /// `add set|map T name { spec [elements = { … } ;] }`: declares the set (an idempotent add)
    /// and adds the elements, which needs no cache of the kernel's table.
    AddSet {
        set: Cow<'a, Set>,
        elements: Vec<Element<'a>>,
    },
    FlushSet(Cow<'a, Set>),
    /// `delete set T name` (maps too: nft takes `set` for either).
    DeleteSet(Cow<'a, str>),
    /// `delete element T set { key }`
    DeleteElement {
        set: Cow<'a, str>,
        key: Cow<'a, str>,
    },
    /// `add chain T name { [hook] [comment] rule ; … }` (or `add chain T name` when all is empty).
    AddChain(Cow<'a, Chain>),
    /// The chain without its rules: `add chain T name { [hook] [comment] }`.
    DeclareChain(Cow<'a, Chain>),
    FlushChain(Cow<'a, str>),
    DeleteChain(Cow<'a, str>),
}

/// Operations on one table, applied together (`nft -f -` commits them as one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction<'a> {
    pub table: Table,
    pub ops: Vec<Op<'a>>,
}

impl<'a> Transaction<'a> {
    pub fn new(family: Family) -> Self {
        Self { table: Table { family }, ops: Vec::new() }
    }

    pub fn push(&mut self, op: Op<'a>) {
        self.ops.push(op);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Declares `set` with `elements` (none: a plain declaration).
    pub fn add_set(&mut self, set: impl Into<Cow<'a, Set>>, elements: Vec<Element<'a>>) {
        self.ops.push(Op::AddSet { set: set.into(), elements });
    }

    /// Adds `elements` to `set` through a declaration; nothing when there are none.
    pub fn add_elements(&mut self, set: impl Into<Cow<'a, Set>>, elements: Vec<Element<'a>>) {
        if !elements.is_empty() {
            self.add_set(set, elements);
        }
    }

    /// The text for `nft -f -`, one command a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    /// [`Transaction::render`], appended to `out`.
    pub fn render_into(&self, out: &mut String) {
        let t = self.table;
        for op in &self.ops {
            match op {
                Op::Heading(text) => {
                    let _ = writeln!(out, "\n# {text}");
                    continue;
                }
                Op::AddTable => {
                    let _ = write!(out, "add table {t}");
                }
                Op::AddTableWithComment => {
                    let _ = write!(out, "add table {t} {{ comment \"managed by ferrolb-speaker\" ; }}");
                }
                Op::CreateTable => {
                    let _ = write!(out, "create table {t} {{ comment \"managed by ferrolb-speaker\" ; }}");
                }
                Op::DeleteTable => {
                    let _ = write!(out, "delete table {t}");
                }
                Op::AddSet { set, elements } => {
                    write_add_set(out, t, set, elements);
                    continue;
                }
                Op::FlushSet(set) => {
                    let _ = write!(out, "flush {} {t} {}", set.kind().as_str(), set.name);
                }
                Op::DeleteSet(name) => {
                    let _ = write!(out, "delete set {t} {name}");
                }
                Op::DeleteElement { set, key } => {
                    let _ = write!(out, "delete element {t} {set} {{ {key} }}");
                }
                Op::AddChain(chain) => write_chain(out, t, chain, true),
                Op::DeclareChain(chain) => write_chain(out, t, chain, false),
                Op::FlushChain(name) => {
                    let _ = write!(out, "flush chain {t} {name}");
                }
                Op::DeleteChain(name) => {
                    let _ = write!(out, "delete chain {t} {name}");
                }
            }
            out.push('\n');
        }
    }
}

/// `add set|map T name { spec [elements = { … } ;] }` and a newline: [`Op::AddSet`], for
/// elements of any kind that writes itself (a large set's elements need not be collected first).
pub fn write_add_set<E: fmt::Display>(out: &mut String, t: Table, set: &Set, elements: impl IntoIterator<Item = E>) {
    let _ = write!(out, "add {} {t} {} {{ ", set.kind().as_str(), set.name);
    set.write_spec(out);
    let mut elements = elements.into_iter().peekable();
    if elements.peek().is_none() {
        out.push_str(" }\n");
        return;
    }
    out.push_str(" elements = { ");
    for (i, e) in elements.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{e}");
    }
    out.push_str(" } ; }\n");
}

/// A chain with its hook, comment and (when `rules`) rules in one command: `nft` needs no cache
/// to add it.
fn write_chain(out: &mut String, t: Table, chain: &Chain, rules: bool) {
    let rules = if rules { chain.rules.as_slice() } else { &[] };
    let _ = write!(out, "add chain {t} {}", chain.name);
    if chain.base.is_none() && chain.comment.is_none() && rules.is_empty() {
        return;
    }
    out.push_str(" {");
    if let Some(base) = &chain.base {
        let _ = write!(out, " {base}");
    }
    if let Some(comment) = &chain.comment {
        let _ = write!(out, " comment \"{}\" ;", bounded_comment(comment));
    }
    for rule in rules {
        let _ = write!(out, " {rule} ;");
    }
    out.push_str(" }");
}

/// `text` as nft can always take it inside `"…"`: characters other than ASCII letters, digits
/// and ` ./:_-~` become `_` (a `"` would end the string, a newline the command), and it is cut
/// to [`COMMENT_MAX`] bytes. Object names are DNS labels, so this changes nothing in practice,
/// but the bound holds whatever the API server lets through.
pub fn bounded_comment(text: &str) -> Cow<'_, str> {
    if text.len() <= COMMENT_MAX && text.chars().all(comment_safe) {
        return Cow::Borrowed(text);
    }
    let mut safe = nft_safe(text);
    safe.truncate(COMMENT_MAX); // ASCII only: every byte is a character boundary.
    Cow::Owned(safe)
}

fn comment_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || " ./:_-~".contains(c)
}

/// `text` with every character but ASCII letters, digits and ` ./:_-~` replaced by `_`.
pub fn nft_safe(text: &str) -> String {
    text.chars().map(|c| if comment_safe(c) { c } else { '_' }).collect()
}

impl<'a> From<&'a Set> for Cow<'a, Set> {
    fn from(set: &'a Set) -> Self {
        Cow::Borrowed(set)
    }
}

impl From<Set> for Cow<'_, Set> {
    fn from(set: Set) -> Self {
        Cow::Owned(set)
    }
}

impl<'a> From<&'a Chain> for Cow<'a, Chain> {
    fn from(chain: &'a Chain) -> Self {
        Cow::Borrowed(chain)
    }
}

impl From<Chain> for Cow<'_, Chain> {
    fn from(chain: Chain) -> Self {
        Cow::Owned(chain)
    }
}
