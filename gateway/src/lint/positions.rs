//! Where each node of a YAML document is: a map from config paths (`routes[3].filters[2]`,
//! `apis[0].versions[1]`, `auth.issuers[0]`) to 1-based (line, column), built from the events
//! of a YAML parser. Block and flow style alike; only the first document counts.

use saphyr_parser::{Event, Parser};
use std::collections::HashMap;

/// Positions of the nodes of one YAML document.
#[derive(Debug, Default, Clone)]
pub struct Positions {
    map: HashMap<String, (usize, usize)>,
}

/// One open collection while walking the events.
enum Frame {
    /// A mapping at `path`: the next node is a key (`key: None`) or the value of `key`.
    Map {
        path: String,
        key: Option<String>,
        expect_key: bool,
    },
    /// A sequence at `path`, with the index of its next item.
    Seq { path: String, next: usize },
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Positions {
    /// Walk `text`'s events. A syntax error ends the walk with what was found so far (the
    /// config was parsed before, so this does not happen for a config lint looks at).
    pub fn parse(text: &str) -> Positions {
        let mut map: HashMap<String, (usize, usize)> = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut documents = 0usize;
        for ev in Parser::new_from_str(text) {
            let Ok((event, span)) = ev else { break };
            let at = (span.start.line(), span.start.col() + 1);
            let is_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::Alias(_)
                    | Event::MappingStart(..)
                    | Event::SequenceStart(..)
            );
            match &event {
                Event::DocumentStart(_) => {
                    documents += 1;
                    if documents > 1 {
                        break;
                    }
                    continue;
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    continue;
                }
                _ if !is_node => continue,
                _ => {}
            }
            // The path of this node; `None` for a mapping key (recorded here).
            let path: Option<String> = match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Seq { path, next }) => {
                    let p = format!("{path}[{next}]");
                    *next += 1;
                    Some(p)
                }
                Some(Frame::Map {
                    path,
                    key,
                    expect_key,
                }) => {
                    if *expect_key {
                        *expect_key = false;
                        match &event {
                            Event::Scalar(v, ..) => {
                                // The key's own position stands for its value.
                                map.entry(join(path, v)).or_insert(at);
                                *key = Some(v.to_string());
                                None
                            }
                            // A complex key: its nodes get a path nothing asks for.
                            _ => {
                                *key = Some("?".to_string());
                                Some(join(path, "?key"))
                            }
                        }
                    } else {
                        *expect_key = true;
                        Some(join(path, key.as_deref().unwrap_or("?")))
                    }
                }
            };
            let Some(path) = path else { continue };
            map.entry(path.clone()).or_insert(at);
            if let Event::MappingStart(..) | Event::SequenceStart(..) = event {
                stack.push(new_frame(&event, path));
            }
        }
        Positions { map }
    }

    /// The (line, column) of `path`, or of its nearest ancestor that has one; (1, 1) when none.
    pub fn get(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(at) = self.map.get(p) {
                return *at;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return (1, 1),
            }
        }
    }

    /// The (line, column) of `path` itself, if the document has that node.
    pub fn exact(&self, path: &str) -> Option<(usize, usize)> {
        self.map.get(path).copied()
    }
}

fn new_frame(event: &Event<'_>, path: String) -> Frame {
    match event {
        Event::MappingStart(..) => Frame::Map {
            path,
            key: None,
            expect_key: true,
        },
        _ => Frame::Seq { path, next: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "\
listeners:
  - name: public
    channel: public
routes:
  - name: a
    filters:
      - kind: cors
      - kind: jwt_auth
        config:
          issuers: [x]
  -   name: b
      pool: p
";

    #[test]
    fn block_style_positions() {
        let p = Positions::parse(BLOCK);
        assert_eq!(p.exact("listeners"), Some((1, 1)));
        assert_eq!(p.exact("listeners[0]"), Some((2, 5)));
        assert_eq!(p.exact("listeners[0].channel"), Some((3, 5)));
        assert_eq!(p.exact("routes[0]"), Some((5, 5)));
        assert_eq!(p.exact("routes[0].filters"), Some((6, 5)));
        assert_eq!(p.exact("routes[0].filters[0]"), Some((7, 9)));
        assert_eq!(p.exact("routes[0].filters[1]"), Some((8, 9)));
        assert_eq!(
            p.exact("routes[0].filters[1].config.issuers"),
            Some((10, 11))
        );
        assert_eq!(
            p.exact("routes[0].filters[1].config.issuers[0]"),
            Some((10, 21))
        );
        assert_eq!(p.exact("routes[1]"), Some((11, 7)));
        assert_eq!(p.exact("routes[1].pool"), Some((12, 7)));
        // An ancestor stands in for a node that is not there.
        assert_eq!(p.get("routes[1].filters[4]"), (11, 7));
        assert_eq!(p.get("nothing.here"), (1, 1));
    }

    #[test]
    fn flow_style_positions() {
        let text = "\
listeners: [ { name: public, channel: public } ]
routes:
  - { name: a, filters: [ { kind: cors }, {kind: jwt_auth} ] }
apis: [{name: x, versions: [{name: v1}, {name: v2, state: live}]}]
";
        let p = Positions::parse(text);
        assert_eq!(p.exact("listeners[0]"), Some((1, 14)));
        assert_eq!(p.exact("listeners[0].channel"), Some((1, 30)));
        assert_eq!(p.exact("routes[0]"), Some((3, 5)));
        assert_eq!(p.exact("routes[0].filters[0]"), Some((3, 27)));
        assert_eq!(p.exact("routes[0].filters[1]"), Some((3, 43)));
        assert_eq!(p.exact("apis[0].versions[1]"), Some((4, 41)));
        assert_eq!(p.exact("apis[0].versions[1].state"), Some((4, 52)));
    }

    #[test]
    fn complex_keys_and_later_documents_are_harmless() {
        let text = "? [a, b]\n: 1\nx: { y: [1, 2] }\n---\nz: 2\n";
        let p = Positions::parse(text);
        assert_eq!(p.exact("x.y[1]"), Some((3, 13)));
        assert_eq!(p.exact("z"), None);
    }
}
