//! Kubernetes label selectors (`matchLabels`, `matchExpressions`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A checked selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<(String, Op, Vec<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Checks a selector; the error names the field and the problem.
    pub(crate) fn parse(selector: &LabelSelector) -> Result<Selector, (String, String)> {
        let mut expressions = Vec::new();
        for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
            let values = e.values.clone().unwrap_or_default();
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err((
                        format!("matchExpressions[{i}].operator"),
                        format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                    ))
                }
            };
            let needs_values = matches!(op, Op::In | Op::NotIn);
            if needs_values == values.is_empty() {
                let why = if needs_values {
                    "needs values"
                } else {
                    "takes no values"
                };
                return Err((
                    format!("matchExpressions[{i}].values"),
                    format!("{} {why}", e.operator),
                ));
            }
            expressions.push((e.key.clone(), op, values));
        }
        Ok(Selector {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    /// Whether it selects everything (`{}`).
    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.expressions.is_empty()
    }

    /// Whether `labels` are selected.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(key, op, values)| {
                let value = labels.get(key);
                match op {
                    Op::In => value.is_some_and(|v| values.contains(v)),
                    Op::NotIn => value.is_none_or(|v| !values.contains(v)),
                    Op::Exists => value.is_some(),
                    Op::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Whether a selector (already known to be valid) selects `labels`; an invalid one
/// selects nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::parse(selector).is_ok_and(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn labels_and_expressions() {
        let s = LabelSelector {
            match_labels: Some(labels(&[("app", "echo")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "version".into(),
                    operator: "In".into(),
                    values: Some(vec!["v1".into(), "v2".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        let s = Selector::parse(&s).expect("valid");
        assert!(s.matches(&labels(&[("app", "echo"), ("version", "v2")])));
        assert!(!s.matches(&labels(&[("app", "echo"), ("version", "v3")])));
        assert!(!s.matches(&labels(&[
            ("app", "echo"),
            ("version", "v1"),
            ("canary", "y")
        ])));
        assert!(!s.matches(&labels(&[("version", "v1")])));
    }

    #[test]
    fn bad_operators_are_named() {
        let s = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "Equals".into(),
                values: None,
            }]),
        };
        let (field, why) = Selector::parse(&s).expect_err("invalid");
        assert_eq!(field, "matchExpressions[0].operator");
        assert!(why.contains("\"Equals\""));
    }
}
