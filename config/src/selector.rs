//! Label selectors, read once from their Kubernetes form and then matched many times.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::ConfigError;

/// A checked Kubernetes label selector: every requirement must hold. The empty selector matches
/// everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

/// One condition on one label. `matchLabels: {k: v}` becomes `In(k, {v})`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Checks a selector as the API server checks those of built-in kinds (a CRD's schema can't):
    /// known operators, values present exactly when the operator needs them, and keys and values
    /// that could be labels at all.
    pub fn from_k8s(selector: &LabelSelector) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::BadSelector { field: "label selector".to_string(), reason };
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            check_key(key).map_err(|r| bad(format!("matchLabels: {r}")))?;
            check_value(value).map_err(|r| bad(format!("matchLabels {key:?}: {r}")))?;
            requirements.push(Requirement::In(key.clone(), BTreeSet::from([value.clone()])));
        }
        for (i, expression) in selector.match_expressions.iter().flatten().enumerate() {
            let at = |reason: String| bad(format!("matchExpressions[{i}]: {reason}"));
            let key = expression.key.clone();
            check_key(&key).map_err(at)?;
            let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
            for value in &values {
                check_value(value).map_err(at)?;
            }
            let operator = expression.operator.as_str();
            let requirement = match operator {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(at(format!("operator {operator} needs at least one value")));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(at(format!("operator {operator} takes no values")));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(at(format!("operator {other:?} is not one of In, NotIn, Exists, DoesNotExist")));
                }
            };
            requirements.push(requirement);
        }
        Ok(Selector { requirements })
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|requirement| match requirement {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// kubectl's spelling, `app=web,tier in (back,front),!legacy`, for logs and messages.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |values: &BTreeSet<String>| values.iter().map(String::as_str).collect::<Vec<_>>().join(",");
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match requirement {
                Requirement::In(key, values) if values.len() == 1 => write!(f, "{key}={}", list(values))?,
                Requirement::In(key, values) => write!(f, "{key} in ({})", list(values))?,
                Requirement::NotIn(key, values) => write!(f, "{key} notin ({})", list(values))?,
                Requirement::Exists(key) => write!(f, "{key}")?,
                Requirement::DoesNotExist(key) => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

/// Checks a list of selectors at `field`, collecting errors rather than stopping at the first.
pub(crate) fn selectors(list: Option<&[LabelSelector]>, field: &str, errors: &mut Vec<ConfigError>) -> Vec<Selector> {
    let mut out = Vec::new();
    for (i, selector) in list.unwrap_or_default().iter().enumerate() {
        match Selector::from_k8s(selector) {
            Ok(s) => out.push(s),
            Err(ConfigError::BadSelector { reason, .. }) => {
                errors.push(ConfigError::BadSelector { field: format!("{field}[{i}]"), reason })
            }
            Err(other) => errors.push(other),
        }
    }
    out
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !valid {
            return Err(format!("label key {key:?}: prefix {prefix:?} is not a lowercase DNS subdomain"));
        }
    }
    if name.is_empty() || !is_label_name(name) {
        return Err(format!(
            "label key {key:?} is not a valid label name (up to 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A label value: empty, or like a label name.
fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} is not valid (up to 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_string(),
            operator: operator.to_string(),
            values: (!values.is_empty()).then(|| values.iter().map(ToString::to_string).collect()),
        }
    }

    fn selector(match_labels: &[(&str, &str)], expressions: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!expressions.is_empty()).then_some(expressions),
        }
    }

    fn checked(s: &LabelSelector) -> Selector {
        Selector::from_k8s(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = checked(&LabelSelector::default());
        assert!(s.is_empty());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_must_all_hold() {
        let s = checked(&selector(&[("app", "web"), ("tier", "front")], vec![]));
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operators_behave_as_in_kubernetes() {
        let s = checked(&selector(&[], vec![expression("tier", "In", &["front", "edge"])]));
        assert!(s.matches(&labels(&[("tier", "edge")])));
        assert!(!s.matches(&labels(&[("tier", "back")])));
        assert!(!s.matches(&labels(&[])), "In needs the label");

        let s = checked(&selector(&[], vec![expression("tier", "NotIn", &["back"])]));
        assert!(s.matches(&labels(&[("tier", "front")])));
        assert!(s.matches(&labels(&[])), "NotIn holds without the label");
        assert!(!s.matches(&labels(&[("tier", "back")])));

        let s = checked(&selector(&[], vec![expression("zone", "Exists", &[])]));
        assert!(s.matches(&labels(&[("zone", "")])));
        assert!(!s.matches(&labels(&[])));

        let s = checked(&selector(&[], vec![expression("legacy", "DoesNotExist", &[])]));
        assert!(s.matches(&labels(&[])));
        assert!(!s.matches(&labels(&[("legacy", "true")])));
    }

    #[test]
    fn labels_and_expressions_combine_with_and() {
        let s = checked(&selector(&[("app", "web")], vec![expression("legacy", "DoesNotExist", &[])]));
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("legacy", "1")])));
        assert!(!s.matches(&labels(&[])));
        assert_eq!(s.to_string(), "app=web,!legacy");
    }

    #[test]
    fn displays_like_kubectl() {
        let s = checked(&selector(
            &[],
            vec![
                expression("tier", "In", &["front", "back"]),
                expression("env", "NotIn", &["dev"]),
                expression("zone", "Exists", &[]),
            ],
        ));
        assert_eq!(s.to_string(), "tier in (back,front),env notin (dev),zone");
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        let cases = [
            (
                selector(&[], vec![expression("tier", "Equals", &["a"])]),
                r#"label selector: matchExpressions[0]: operator "Equals" is not one of In, NotIn, Exists, DoesNotExist"#,
            ),
            (
                selector(&[], vec![expression("tier", "In", &[])]),
                "label selector: matchExpressions[0]: operator In needs at least one value",
            ),
            (
                selector(&[], vec![expression("zone", "Exists", &["a"])]),
                "label selector: matchExpressions[0]: operator Exists takes no values",
            ),
            (
                selector(&[("bad key", "x")], vec![]),
                r#"label selector: matchLabels: label key "bad key" is not a valid label name (up to 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"#,
            ),
            (
                selector(&[("Example.com/app", "x")], vec![]),
                r#"label selector: matchLabels: label key "Example.com/app": prefix "Example.com" is not a lowercase DNS subdomain"#,
            ),
            (
                selector(&[("app", "-web")], vec![]),
                r#"label selector: matchLabels "app": label value "-web" is not valid (up to 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit)"#,
            ),
        ];
        for (s, message) in cases {
            let err = Selector::from_k8s(&s).expect_err(message);
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn prefixed_keys_are_fine() {
        let s = checked(&selector(&[("kubernetes.io/metadata.name", "web")], vec![]));
        assert!(s.matches(&labels(&[("kubernetes.io/metadata.name", "web")])));
        let s = checked(&selector(
            &[],
            vec![expression("node.kubernetes.io/exclude-from-external-load-balancers", "DoesNotExist", &[])],
        ));
        assert!(s.matches(&labels(&[])));
    }
}
