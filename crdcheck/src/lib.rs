//! The checks an API server makes of a custom resource before it stores it: the
//! CustomResourceDefinition's `openAPIV3Schema` for the object's version (types, enums,
//! ranges, patterns, required fields, sizes) with unknown fields refused, as `kubectl`'s
//! strict field validation does, and the schema's CEL rules
//! (`x-kubernetes-validations`), after the schema's defaults. Objects are checked as
//! created: transition rules (`oldSelf`) are for updates and are skipped. Not modelled:
//! list-type uniqueness, CEL cost budgets.
//!
//! It stands in for the API server wherever there is none (the sandbox, tests), so an
//! object a cluster would refuse is refused there too, naming the field as the API server
//! does (`spec.fault.delay.percent: ...`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

/// Why a CRD cannot be used to check objects.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// Not a CustomResourceDefinition with a schema per version.
    #[error("not a usable CustomResourceDefinition: {0}")]
    Shape(String),
    /// A version's schema is not a valid JSON schema.
    #[error("CRD {crd} version {version}: the schema does not compile: {why}")]
    Schema {
        /// `plural.group`.
        crd: String,
        /// The version.
        version: String,
        /// Why.
        why: String,
    },
    /// A CEL rule does not parse.
    #[error("CRD {crd} version {version}: the rule {rule:?} at {at} does not parse: {why}")]
    Rule {
        /// `plural.group`.
        crd: String,
        /// The version.
        version: String,
        /// The rule.
        rule: String,
        /// Where in the schema.
        at: String,
        /// Why.
        why: String,
    },
}

/// One reason an object is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, as the API server names it: `spec.rules[0].to[0].ports[0]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field.is_empty() {
            true => write!(f, "{}", self.message),
            false => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// A compiled CEL rule of the schema, with where it applies.
struct Rule {
    /// The schema path it sits at: property names, `[]` for list items and `{}` for
    /// map values.
    at: Vec<Step>,
    source: String,
    message: Option<String>,
    program: cel::Program,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Property(String),
    Item,
    Value,
}

/// The CEL environment of Kubernetes' validation rules: the standard library with
/// durations, and the strings extension (`split`, `lowerAscii`, ...).
fn environment() -> Result<Arc<cel::Env>, String> {
    let mut env = cel::Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(env))
}

/// One version of a CRD, ready to check objects.
struct Version {
    /// The schema as written, for its defaults.
    raw: Value,
    schema: jsonschema::Validator,
    rules: Vec<Rule>,
}

/// A CustomResourceDefinition's checks, for every version it serves.
pub struct Crd {
    env: Arc<cel::Env>,
    /// `group`.
    group: String,
    /// `spec.names.kind`.
    kind: String,
    versions: BTreeMap<String, Version>,
}

impl std::fmt::Debug for Crd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crd")
            .field("group", &self.group)
            .field("kind", &self.kind)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Crd {
    /// Reads a CustomResourceDefinition (as JSON).
    pub fn new(crd: &Value) -> Result<Crd, CrdError> {
        let shape = |what: &str| CrdError::Shape(what.to_owned());
        let spec = &crd["spec"];
        let group = spec["group"]
            .as_str()
            .ok_or_else(|| shape("no spec.group"))?;
        let kind = spec["names"]["kind"]
            .as_str()
            .ok_or_else(|| shape("no spec.names.kind"))?;
        let plural = spec["names"]["plural"].as_str().unwrap_or(kind);
        let name = format!("{plural}.{group}");
        let env = environment().map_err(CrdError::Shape)?;
        let mut versions = BTreeMap::new();
        for v in spec["versions"].as_array().into_iter().flatten() {
            let Some(version) = v["name"].as_str() else {
                return Err(shape("a version without a name"));
            };
            if v["served"] == Value::Bool(false) {
                continue;
            }
            let Some(schema) = v["schema"]["openAPIV3Schema"].as_object() else {
                return Err(CrdError::Shape(format!("version {version} has no schema")));
            };
            let mut schema = Value::Object(schema.clone());
            let mut rules = Vec::new();
            collect_rules(&env, &schema, &mut Vec::new(), &mut rules).map_err(
                |(rule, at, why)| CrdError::Rule {
                    crd: name.clone(),
                    version: version.to_owned(),
                    rule,
                    at,
                    why,
                },
            )?;
            let raw = schema.clone();
            strict(&mut schema, true);
            let schema = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft4)
                .build(&schema)
                .map_err(|e| CrdError::Schema {
                    crd: name.clone(),
                    version: version.to_owned(),
                    why: e.to_string(),
                })?;
            versions.insert(version.to_owned(), Version { raw, schema, rules });
        }
        if versions.is_empty() {
            return Err(CrdError::Shape(format!("{name} serves no version")));
        }
        Ok(Crd {
            env,
            group: group.to_owned(),
            kind: kind.to_owned(),
            versions,
        })
    }

    /// `group/kind`.
    pub fn group_kind(&self) -> (&str, &str) {
        (&self.group, &self.kind)
    }

    /// Whether `object` (with `apiVersion` and `kind`) is of this CRD.
    pub fn is_for(&self, object: &Value) -> bool {
        let group = object["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/'))
            .map(|(g, _)| g);
        group == Some(self.group.as_str()) && object["kind"].as_str() == Some(&self.kind)
    }

    /// What an API server would refuse `object` for; empty when it would store it.
    pub fn check(&self, object: &Value) -> Vec<Violation> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let version = api_version.split_once('/').map_or("", |(_, v)| v);
        let Some(checks) = self.versions.get(version) else {
            return vec![Violation {
                field: "apiVersion".into(),
                message: format!(
                    "{api_version:?} is not served; the CRD serves {}",
                    self.versions
                        .keys()
                        .map(|v| format!("{}/{v}", self.group))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }];
        };
        // As the API server: defaults first, then the checks.
        let mut object = object.clone();
        apply_defaults(&checks.raw, &mut object);
        let object = &object;
        let mut out: Vec<Violation> = checks
            .schema
            .iter_errors(object)
            .map(|e| Violation {
                field: field_of_pointer(&e.instance_path().to_string()),
                message: e.to_string(),
            })
            .collect();
        for rule in &checks.rules {
            for (field, value) in values_at(object, &rule.at) {
                if let Some(why) = failed(&self.env, rule, value) {
                    out.push(Violation {
                        field,
                        message: why,
                    });
                }
            }
        }
        out
    }
}

/// A rule's verdict on `value`: `None` when it holds.
fn failed(env: &Arc<cel::Env>, rule: &Rule, value: &Value) -> Option<String> {
    let mut context = cel::Context::with_env(env.clone());
    if let Err(e) = context.add_variable("self", value.clone()) {
        return Some(format!("cannot evaluate the rule {:?}: {e}", rule.source));
    }
    match rule.program.execute(&context) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => Some(
            rule.message
                .clone()
                .unwrap_or_else(|| format!("failed rule: {}", rule.source)),
        ),
        Ok(other) => Some(format!(
            "the rule {:?} gave {other:?}, not a boolean",
            rule.source
        )),
        Err(e) => Some(format!("the rule {:?} failed: {e}", rule.source)),
    }
}

/// Fills in the schema's `default`s where `value` lacks the field, as the API server does
/// before it validates (and before it stores).
fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema["properties"].as_object() {
                for (name, sub) in props {
                    if !map.contains_key(name) {
                        if let Some(default) = sub.get("default") {
                            map.insert(name.clone(), default.clone());
                        }
                    }
                    if let Some(v) = map.get_mut(name) {
                        apply_defaults(sub, v);
                    }
                }
            }
            if schema["additionalProperties"].is_object() {
                for v in map.values_mut() {
                    apply_defaults(&schema["additionalProperties"], v);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for v in items {
                apply_defaults(&schema["items"], v);
            }
        }
        _ => {}
    }
}

/// Every CEL rule of `schema`, compiled, with the path it applies at.
fn collect_rules(
    env: &cel::Env,
    schema: &Value,
    at: &mut Vec<Step>,
    out: &mut Vec<Rule>,
) -> Result<(), (String, String, String)> {
    for v in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let source = v["rule"].as_str().unwrap_or_default().to_owned();
        // A transition rule (it reads `oldSelf`) applies to updates only: objects are
        // checked here as created.
        if source.contains("oldSelf") {
            continue;
        }
        let program = env
            .compile(&source)
            .map_err(|e| (source.clone(), describe(at), e.to_string()))?;
        out.push(Rule {
            at: at.clone(),
            message: v["message"].as_str().map(str::to_owned),
            source,
            program,
        });
    }
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            at.push(Step::Property(name.clone()));
            collect_rules(env, sub, at, out)?;
            at.pop();
        }
    }
    if schema["items"].is_object() {
        at.push(Step::Item);
        collect_rules(env, &schema["items"], at, out)?;
        at.pop();
    }
    if schema["additionalProperties"].is_object() {
        at.push(Step::Value);
        collect_rules(env, &schema["additionalProperties"], at, out)?;
        at.pop();
    }
    Ok(())
}

fn describe(at: &[Step]) -> String {
    let mut s = String::new();
    for step in at {
        match step {
            Step::Property(p) if s.is_empty() => s.push_str(p),
            Step::Property(p) => {
                s.push('.');
                s.push_str(p);
            }
            Step::Item => s.push_str("[*]"),
            Step::Value => s.push_str("[*]"),
        }
    }
    match s.is_empty() {
        true => "the root".to_owned(),
        false => s,
    }
}

/// The values of `object` at `at`, each with its field name.
fn values_at<'a>(object: &'a Value, at: &[Step]) -> Vec<(String, &'a Value)> {
    let mut found = vec![(String::new(), object)];
    for step in at {
        let mut next = Vec::new();
        for (field, value) in found {
            match step {
                Step::Property(p) => {
                    if let Some(v) = value.get(p).filter(|v| !v.is_null()) {
                        let field = match field.is_empty() {
                            true => p.clone(),
                            false => format!("{field}.{p}"),
                        };
                        next.push((field, v));
                    }
                }
                Step::Item => {
                    for (i, v) in value.as_array().into_iter().flatten().enumerate() {
                        next.push((format!("{field}[{i}]"), v));
                    }
                }
                Step::Value => {
                    for (k, v) in value.as_object().into_iter().flatten() {
                        next.push((format!("{field}[{k}]"), v));
                    }
                }
            }
        }
        found = next;
    }
    found
}

/// Makes the schema refuse what an API server refuses or drops: unknown fields of an
/// object with declared properties (unless it preserves unknown fields), and `null`
/// only where `nullable`. The root's `metadata` is the API server's own business.
fn strict(schema: &mut Value, root: bool) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    if root {
        // Every object has these, whatever the schema declares.
        let props = map
            .entry("properties")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(props) = props.as_object_mut() {
            for (field, kind) in [
                ("apiVersion", "string"),
                ("kind", "string"),
                ("metadata", "object"),
            ] {
                props
                    .entry(field)
                    .or_insert_with(|| serde_json::json!({ "type": kind }));
            }
        }
    }
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserve {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    if map.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(Value::String(t)) = map.get("type").cloned() {
            map.insert("type".into(), Value::Array(vec![t.into(), "null".into()]));
        }
    }
    if let Some(Value::Object(props)) = map.get_mut("properties") {
        for (name, sub) in props.iter_mut() {
            if root && name == "metadata" {
                continue;
            }
            strict(sub, false);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = map.get_mut(key) {
            strict(sub, false);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = map.get_mut(key) {
            for sub in subs {
                strict(sub, false);
            }
        }
    }
}

/// `/spec/rules/0/to/0/ports/0` as `spec.rules[0].to[0].ports[0]`.
fn field_of_pointer(pointer: &str) -> String {
    let mut field = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if part.parse::<usize>().is_ok() {
            field.push_str(&format!("[{part}]"));
        } else {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(&part);
        }
    }
    field
}

/// A set of CRDs, to check any object of theirs.
#[derive(Debug, Default, Clone)]
pub struct Crds(Vec<Arc<Crd>>);

impl Crds {
    /// Reads every CustomResourceDefinition among `documents` (other kinds are skipped).
    pub fn new<'a>(documents: impl IntoIterator<Item = &'a Value>) -> Result<Crds, CrdError> {
        let mut out = Vec::new();
        for d in documents {
            if d["kind"] == "CustomResourceDefinition" {
                out.push(Arc::new(Crd::new(d)?));
            }
        }
        Ok(Crds(out))
    }

    /// The CRD `object` is of, if any.
    pub fn for_object(&self, object: &Value) -> Option<&Crd> {
        self.0.iter().find(|c| c.is_for(object)).map(|c| &**c)
    }

    /// What an API server with these CRDs would refuse `object` for; `None` when the
    /// object is of none of them.
    pub fn check(&self, object: &Value) -> Option<Vec<Violation>> {
        self.for_object(object).map(|c| c.check(object))
    }
}

/// A ValidatingAdmissionPolicy's verdict on one request, as the API server reaches it:
/// the policy's match conditions, then its validations, with `object`, `oldObject` (JSON
/// `null` on create) and `request` bound (Kubernetes' CEL environment, as for CRD rules).
/// Matching the request's resource against `matchConstraints` is left to the caller.
/// `Ok(None)`: admitted (or not matched); `Ok(Some(message))`: denied.
pub fn admission(
    policy: &Value,
    object: &Value,
    old_object: &Value,
    request: &Value,
) -> Result<Option<String>, String> {
    let env = environment()?;
    let run = |source: &str| -> Result<cel::Value, String> {
        let program = env
            .compile(source)
            .map_err(|e| format!("{source:?} does not parse: {e}"))?;
        let mut context = cel::Context::with_env(env.clone());
        for (name, value) in [
            ("object", object),
            ("oldObject", old_object),
            ("request", request),
        ] {
            context
                .add_variable(name, value.clone())
                .map_err(|e| format!("cannot bind {name}: {e}"))?;
        }
        program
            .execute(&context)
            .map_err(|e| format!("{source:?} failed: {e}"))
    };
    let spec = &policy["spec"];
    for condition in spec["matchConditions"].as_array().into_iter().flatten() {
        let source = condition["expression"].as_str().unwrap_or_default();
        match run(source)? {
            cel::Value::Bool(true) => {}
            cel::Value::Bool(false) => return Ok(None),
            other => return Err(format!("{source:?} gave {other:?}, not a boolean")),
        }
    }
    for validation in spec["validations"].as_array().into_iter().flatten() {
        let source = validation["expression"].as_str().unwrap_or_default();
        match run(source)? {
            cel::Value::Bool(true) => {}
            cel::Value::Bool(false) => {
                let message = match validation["messageExpression"].as_str() {
                    Some(m) => match run(m)? {
                        cel::Value::String(s) => s.to_string(),
                        other => format!("{other:?}"),
                    },
                    None => validation["message"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("failed expression: {source}")),
                };
                return Ok(Some(message));
            }
            other => return Err(format!("{source:?} gave {other:?}, not a boolean")),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "spec": {
                "group": "example.dev",
                "names": {"kind": "Widget", "plural": "widgets"},
                "versions": [{
                    "name": "v1",
                    "served": true,
                    "schema": {"openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "mode": {"type": "string", "enum": ["A", "B"]},
                                    "note": {"type": "string", "nullable": true},
                                    "parts": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "min": {"type": "integer"},
                                                "max": {"type": "integer"}
                                            },
                                            "x-kubernetes-validations": [{
                                                "rule": "self.min <= self.max",
                                                "message": "min must not exceed max"
                                            }]
                                        }
                                    }
                                }
                            }
                        }
                    }}
                }]
            }
        })
    }

    fn widget(spec: Value) -> Value {
        json!({"apiVersion": "example.dev/v1", "kind": "Widget",
               "metadata": {"name": "w", "anything": {"goes": 1}}, "spec": spec})
    }

    #[test]
    fn a_valid_object_passes() {
        let c = Crd::new(&crd()).expect("crd");
        let v = c.check(&widget(json!({"size": 3, "mode": "A", "note": null,
                                       "parts": [{"min": 1, "max": 2}]})));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn schema_violations_name_the_field() {
        let c = Crd::new(&crd()).expect("crd");
        let mut typo = widget(json!({"size": 1}));
        typo["spce"] = json!({});
        let v = c.check(&typo);
        assert!(v.iter().any(|v| v.message.contains("spce")), "{v:?}");
        let v = c.check(&widget(json!({"size": 30, "mode": "C", "extra": true})));
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&"spec.size"), "{v:?}");
        assert!(fields.contains(&"spec.mode"), "{v:?}");
        assert!(
            v.iter().any(|v| v.message.contains("extra")),
            "unknown fields are refused: {v:?}"
        );
        let missing = c.check(&widget(json!({})));
        assert!(
            missing
                .iter()
                .any(|v| v.field == "spec" && v.message.contains("size")),
            "{missing:?}"
        );
    }

    #[test]
    fn cel_rules_apply_where_they_sit() {
        let c = Crd::new(&crd()).expect("crd");
        let v = c.check(&widget(json!({"size": 1, "parts": [
            {"min": 1, "max": 2}, {"min": 5, "max": 2}
        ]})));
        assert_eq!(
            v,
            [Violation {
                field: "spec.parts[1]".into(),
                message: "min must not exceed max".into()
            }]
        );
    }

    #[test]
    fn transition_rules_do_not_apply_to_a_new_object() {
        let mut c = crd();
        c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"] =
            json!([{"rule": "self.size == oldSelf.size", "message": "immutable"}]);
        let v = Crd::new(&c)
            .expect("crd")
            .check(&widget(json!({"size": 2})));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn an_unserved_version_and_a_bad_rule_are_named() {
        let c = Crd::new(&crd()).expect("crd");
        let mut w = widget(json!({"size": 1}));
        w["apiVersion"] = json!("example.dev/v9");
        let v = c.check(&w);
        assert_eq!(v[0].field, "apiVersion");
        assert!(v[0].message.contains("example.dev/v1"), "{v:?}");
        let mut bad = crd();
        bad["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"] = json!([{"rule": "self.size >"}]);
        let e = Crd::new(&bad).expect_err("does not parse");
        assert!(e.to_string().contains("at spec"), "{e}");
    }

    #[test]
    fn pointers_read_as_field_paths() {
        assert_eq!(
            field_of_pointer("/spec/rules/0/to/0/ports/0"),
            "spec.rules[0].to[0].ports[0]"
        );
        assert_eq!(field_of_pointer(""), "");
    }
}
