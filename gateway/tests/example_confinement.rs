//! Every example config confines the routes that admit patient-context tokens.
//!
//! Examples are copied into production. A route whose `jwt_auth` admits an issuer with
//! `claims.patient` and that lacks `smart_scopes` and `patient_compartment` after it lets any
//! patient read any patient; no example may show one. The examples are every YAML file under
//! `conf/` (recursively, but not the lint fixtures of `conf/lint/`) that contains `listeners:`,
//! and every ```yaml block of `README.md` and `docs/*.md` that contains `listeners:` and parses
//! as a whole config (a block that does not is a fragment, and is counted as skipped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use caregate::config::{parse, substitute_env, Config, ConfigError};
use caregate::confinement::unconfined_patient_routes;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// One example: where it comes from (`conf/demo.yaml`, `docs/configuration.md:413`) and its text.
struct Example {
    source: String,
    text: String,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.yaml`/`.yml` file under `conf/` that contains `listeners:`, sorted.
fn conf_examples() -> Vec<Example> {
    let root = repo_root();
    let mut out = Vec::new();
    let mut stack = vec![root.join("conf")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                // conf/lint holds `caregate lint` fixtures, some unconfined on purpose.
                if p != root.join("conf").join("lint") {
                    stack.push(p);
                }
                continue;
            }
            let yaml = p.extension().is_some_and(|x| x == "yaml" || x == "yml");
            if !yaml {
                continue;
            }
            let text = read(&p);
            if text.contains("listeners:") {
                let source = p
                    .strip_prefix(&root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push(Example { source, text });
            }
        }
    }
    out.sort_by(|a, b| a.source.cmp(&b.source));
    out.push(deploy_config());
    out
}

/// The caregate.yaml embedded in the Kubernetes ConfigMap (deploy/kubernetes/configmap.yaml).
fn deploy_config() -> Example {
    let source = "deploy/kubernetes/configmap.yaml";
    let text = read(&repo_root().join(source));
    let start = text
        .find("  caregate.yaml: |\n")
        .unwrap_or_else(|| panic!("{source}: no caregate.yaml key"));
    let body: Vec<&str> = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    Example {
        source: format!("{source} (caregate.yaml)"),
        text: body.join("\n"),
    }
}

/// The ```yaml (or ```yml) fenced blocks of a Markdown text, with the line of their opening fence.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let t = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = t.strip_prefix("```") {
                    let lang = info.trim();
                    // Line 0 marks another language's block: skipped up to its closing fence.
                    let start = if lang == "yaml" || lang == "yml" {
                        i + 1
                    } else {
                        0
                    };
                    open = Some((start, String::new()));
                }
            }
            Some((start, body)) => {
                if t.trim_end() == "```" {
                    if *start > 0 {
                        out.push((*start, std::mem::take(body)));
                    }
                    open = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    out
}

/// Every ```yaml block of `README.md` and `docs/*.md` that contains `listeners:`.
fn markdown_examples() -> Vec<Example> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for f in files {
        let name = f
            .strip_prefix(&root)
            .unwrap_or(&f)
            .to_string_lossy()
            .replace('\\', "/");
        for (line, text) in yaml_blocks(&read(&f)) {
            if text.contains("listeners:") {
                out.push(Example {
                    source: format!("{name}:{line}"),
                    text,
                });
            }
        }
    }
    out
}

/// Parse an example with every `${VAR}` replaced by a placeholder (long enough for a key).
fn parse_example(text: &str) -> Result<Config, ConfigError> {
    // `${file:/path}` secrets: a placeholder too (the files exist only where it is deployed).
    let mut text = text.to_string();
    while let Some(at) = text.find("${file:") {
        let end = text[at..].find('}').map_or(text.len(), |e| at + e + 1);
        text.replace_range(
            at..end,
            "placeholder-for-a-secret-file-of-at-least-32-bytes",
        );
    }
    let text = substitute_env(&text, |name| {
        Some(format!("placeholder-for-{name}-of-at-least-32-bytes"))
    })?;
    // `parse` substitutes again; keep a literal `${` (written `$${`) literal.
    parse(&text.replace("${", "$${"))
}

#[test]
fn every_example_confines_its_patient_routes() {
    let mut checked: Vec<String> = Vec::new();
    let mut broken: Vec<String> = Vec::new();
    let mut fragments: Vec<String> = Vec::new();
    let mut offenders: Vec<String> = Vec::new();

    let conf = conf_examples();
    let markdown = markdown_examples();
    for (ex, whole_file) in conf
        .iter()
        .map(|e| (e, true))
        .chain(markdown.iter().map(|e| (e, false)))
    {
        let cfg = match parse_example(&ex.text) {
            Ok(cfg) => cfg,
            // A config file must parse; a Markdown block that does not is a fragment.
            Err(e) if whole_file => {
                broken.push(format!("{}: {e}", ex.source));
                continue;
            }
            Err(_) => {
                fragments.push(ex.source.clone());
                continue;
            }
        };
        for finding in unconfined_patient_routes(&cfg) {
            offenders.push(format!("{}: {finding}", ex.source));
        }
        checked.push(ex.source.clone());
    }
    eprintln!(
        "checked {} example configs: {}; skipped {} fragments: {}",
        checked.len(),
        checked.join(", "),
        fragments.len(),
        fragments.join(", ")
    );

    assert!(
        broken.is_empty(),
        "config files under conf/ that do not parse:\n{}",
        broken.join("\n")
    );
    for must in [
        "conf/demo.yaml",
        "conf/caregate.example.yaml",
        "deploy/kubernetes/configmap.yaml (caregate.yaml)",
    ] {
        assert!(
            checked.iter().any(|c| c == must),
            "{must} was not checked (checked: {checked:?})"
        );
    }
    assert!(
        checked
            .iter()
            .any(|c| c.starts_with("docs/configuration.md:")),
        "the full example of docs/configuration.md was not checked (checked: {checked:?}; \
         fragments: {fragments:?})"
    );
    assert!(
        offenders.is_empty(),
        "{} example route(s) admit patient-context tokens without smart_scopes and \
         patient_compartment after jwt_auth (any patient could read any patient):\n{}",
        offenders.len(),
        offenders.join("\n")
    );
}

const SCOPES_LINE: &str = "      - { kind: smart_scopes }\n";
const COMPARTMENT_LINE: &str = "      - { kind: patient_compartment }\n";

/// The example with the two confining filters taken out again, as it was first shipped.
fn unconfine(text: &str, source: &str) -> String {
    for line in [SCOPES_LINE, COMPARTMENT_LINE] {
        assert_eq!(
            text.matches(line).count(),
            1,
            "{source}: expected `{}` exactly once",
            line.trim()
        );
    }
    text.replace(SCOPES_LINE, "").replace(COMPARTMENT_LINE, "")
}

fn assert_patient_fhir_caught(text: &str, source: &str) {
    let confined = parse_example(text).unwrap_or_else(|e| panic!("{source}: {e}"));
    assert!(
        unconfined_patient_routes(&confined).is_empty(),
        "{source}: {:?}",
        unconfined_patient_routes(&confined)
    );

    let original = parse_example(&unconfine(text, source)).unwrap();
    let findings = unconfined_patient_routes(&original);
    // The route as written, or its copies per API version (`patient-fhir@v1`, ...), and
    // nothing else.
    let f = findings
        .iter()
        .find(|f| f.route == "patient-fhir" || f.route.starts_with("patient-fhir@"))
        .unwrap_or_else(|| panic!("{source}: patient-fhir not named: {findings:?}"));
    assert!(
        findings
            .iter()
            .all(|f| f.route == "patient-fhir" || f.route.starts_with("patient-fhir@")),
        "{source}: {findings:?}"
    );
    assert_eq!(f.issuers, vec!["patients-idp".to_string()]);
    let text = f.to_string();
    assert!(text.contains("route `patient-fhir"), "{text}");
    assert!(
        text.contains("no `smart_scopes` after `jwt_auth`"),
        "{text}"
    );
    assert!(
        text.contains("no `patient_compartment` after `jwt_auth`"),
        "{text}"
    );
}

#[test]
fn the_original_defect_is_caught() {
    let path = repo_root().join("conf/caregate.example.yaml");
    assert_patient_fhir_caught(&read(&path), "conf/caregate.example.yaml");

    let block = markdown_examples()
        .into_iter()
        .find(|e| e.source.starts_with("docs/configuration.md:") && e.text.contains("patient-fhir"))
        .expect("the full example of docs/configuration.md");
    assert_patient_fhir_caught(&block.text, &block.source);
}

#[test]
fn yaml_blocks_are_found_with_their_line() {
    let md = "intro\n```yaml\na: 1\n```\n```sh\nlisteners:\n```\n  ```yml\n  b: 2\n  ```\n";
    let blocks = yaml_blocks(md);
    assert_eq!(
        blocks,
        vec![(2, "a: 1\n".to_string()), (8, "  b: 2\n".to_string())]
    );
}
