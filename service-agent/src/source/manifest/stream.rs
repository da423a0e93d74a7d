//! Reading a manifest file a piece at a time, so that memory follows the
//! largest object, not the file.
//!
//! `kubectl get svc,endpointslices -A -o yaml > all.yaml` writes one YAML
//! document, a `List` whose `items` are every object: tens of megabytes at
//! 10,000 Services, and YAML parsers read a document whole. This splitter
//! cuts the file at document markers and a List's block sequence into its
//! items by their indentation alone (block YAML puts every item's own lines
//! deeper than its `- `), and each piece goes through the same parser as a
//! whole file would.
//!
//! Anything it does not follow (directives, content on a `---` line, an
//! item that is not valid YAML on its own, such as one using another's
//! anchor) makes the caller read the file whole instead: same objects, same
//! errors, only more memory.
//!
//! A List's items are typed in batches spread over the CPUs: parsing YAML
//! is most of what a start from one big file costs, and the items are
//! independent of each other. Each is typed straight from the parser's
//! events where `direct` can, through a `serde_yaml_ng::Value` otherwise.
use std::{io::BufRead, num::NonZeroUsize, thread};

use super::{
    direct,
    parse::{FileObjects, ManifestError, Sink, add_document, parse_documents},
};

/// Why the file must be read whole.
pub(super) enum Stream {
    ReadWhole,
    Failed(ManifestError),
}

impl From<ManifestError> for Stream {
    fn from(e: ManifestError) -> Self {
        Stream::Failed(e)
    }
}

/// The document being read: the lines outside `items`, and the items typed
/// so far (kept apart: only a `v1 List`'s items are the dataplane's, and
/// `kind` may come after them, as kubectl writes it).
#[derive(Default)]
struct Document<S> {
    head: String,
    /// Began with an explicit `---` (an empty one is still a document).
    marked: bool,
    has_items: bool,
    items: S,
    failed: Option<ManifestError>,
    /// Item texts read but not typed yet.
    untyped: Vec<String>,
}

/// Items typed together: enough that a batch's threads cost little next to
/// its parsing, few enough that the texts held stay small.
const ITEM_BATCH: usize = 512;

struct ItemBlock {
    /// The indentation of the items' `- `, once the first is seen.
    indent: Option<usize>,
    current: String,
}

pub(super) fn parse_stream<S: Sink>(reader: impl BufRead, name: &str) -> Result<S, Stream> {
    let mut out = S::default();
    let mut index = 0usize;
    let mut doc = Document::<S>::default();
    let mut block: Option<ItemBlock> = None;
    for line in reader.lines() {
        let mut line = line.map_err(|_| Stream::ReadWhole)?;
        if line.ends_with('\r') {
            line.pop();
        }
        if let Some(rest) = marker(&line, "---") {
            if !blank(rest) {
                return Err(Stream::ReadWhole);
            }
            end_items(&mut block, &mut doc, name, index + 1)?;
            finish(&mut doc, &mut out, &mut index, name)?;
            doc.marked = true;
            continue;
        }
        if let Some(rest) = marker(&line, "...") {
            if !blank(rest) {
                return Err(Stream::ReadWhole);
            }
            end_items(&mut block, &mut doc, name, index + 1)?;
            finish(&mut doc, &mut out, &mut index, name)?;
            continue;
        }
        if line.starts_with('%') {
            return Err(Stream::ReadWhole);
        }
        if let Some(b) = &mut block {
            let body = line.trim_start_matches(' ');
            let indent = line.len() - body.len();
            if blank(body) {
                b.current.push_str(&line);
                b.current.push('\n');
                continue;
            }
            let starts_item = body == "-" || body.starts_with("- ");
            let item_indent = *b.indent.get_or_insert(indent);
            if !starts_item && b.current.is_empty() {
                // `items:` followed by something other than a block
                // sequence (a mapping, a flow list on the next line).
                return Err(Stream::ReadWhole);
            }
            if indent == item_indent && starts_item {
                end_item(b, &mut doc, name, index + 1)?;
                b.current.push_str(&line[item_indent..]);
                b.current.push('\n');
                continue;
            }
            if indent > item_indent {
                b.current.push_str(&line[item_indent..]);
                b.current.push('\n');
                continue;
            }
            // Back at the document's top level: the items are done.
            end_items(&mut block, &mut doc, name, index + 1)?;
        }
        if is_items_key(&line) && !doc.has_items {
            doc.has_items = true;
            block = Some(ItemBlock {
                indent: None,
                current: String::new(),
            });
            continue;
        }
        doc.head.push_str(&line);
        doc.head.push('\n');
    }
    end_items(&mut block, &mut doc, name, index + 1)?;
    finish(&mut doc, &mut out, &mut index, name)?;
    Ok(out)
}

/// The rest of the line after a document marker at its start.
fn marker<'a>(line: &'a str, m: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(m)?;
    (rest.is_empty() || rest.starts_with([' ', '\t'])).then_some(rest)
}

/// Nothing but spaces and perhaps a comment.
fn blank(s: &str) -> bool {
    let t = s.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// `items:` as a top-level key with its value on the following lines.
fn is_items_key(line: &str) -> bool {
    line.strip_prefix("items:").is_some_and(blank)
}

fn end_items<S: Sink>(
    block: &mut Option<ItemBlock>,
    doc: &mut Document<S>,
    name: &str,
    index: usize,
) -> Result<(), Stream> {
    if let Some(mut b) = block.take() {
        end_item(&mut b, doc, name, index)?;
        type_items(doc, name, index)?;
    }
    Ok(())
}

/// Queues the item read so far (a one-element block sequence) for typing.
fn end_item<S: Sink>(
    b: &mut ItemBlock,
    doc: &mut Document<S>,
    name: &str,
    index: usize,
) -> Result<(), Stream> {
    let text = std::mem::take(&mut b.current);
    if blank_text(&text) {
        return Ok(());
    }
    doc.untyped.push(text);
    if doc.untyped.len() >= ITEM_BATCH {
        type_items(doc, name, index)?;
    }
    Ok(())
}

/// Types the queued items, a share of them on each CPU, and adds them to
/// the document in their order.
fn type_items<S: Sink>(doc: &mut Document<S>, name: &str, index: usize) -> Result<(), Stream> {
    let texts = std::mem::take(&mut doc.untyped);
    if texts.is_empty() {
        return Ok(());
    }
    let cpus = thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let share = texts.len().div_ceil(cpus.min(texts.len()));
    let typed: Vec<Result<Typed<S>, Stream>> = thread::scope(|scope| {
        let mut parts = texts.chunks(share);
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|part| scope.spawn(move || type_part::<S>(part, name, index)))
            .collect();
        let mut typed = vec![type_part::<S>(first, name, index)];
        typed.extend(
            others
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
        );
        typed
    });
    for part in typed {
        let part = part?;
        // After a bad item the rest is only read through: the whole file
        // is refused anyway if this is a List.
        if doc.failed.is_none() {
            doc.items.append(part.items);
            doc.failed = part.failed;
        }
    }
    Ok(())
}

/// Items of one part, up to the first that failed to type.
struct Typed<S> {
    items: S,
    failed: Option<ManifestError>,
}

fn type_part<S: Sink>(texts: &[String], name: &str, index: usize) -> Result<Typed<S>, Stream> {
    let mut out = Typed {
        items: S::default(),
        failed: None,
    };
    for text in texts {
        if out.failed.is_none()
            && direct::type_item(text, &mut out.items, || format!("{name}#{index}"))
        {
            continue;
        }
        let mut items: Vec<serde_yaml_ng::Value> =
            serde_yaml_ng::from_str(text).map_err(|_| Stream::ReadWhole)?;
        let (Some(item), None) = (items.pop(), items.pop()) else {
            return Err(Stream::ReadWhole);
        };
        if out.failed.is_none()
            && let Err(e) = add_document(&mut out.items, item, name, index)
        {
            out.failed = Some(e);
        }
    }
    Ok(out)
}

fn blank_text(text: &str) -> bool {
    text.lines().all(blank)
}

/// Ends the current document: its objects go to `out`.
fn finish<S: Sink>(
    doc: &mut Document<S>,
    out: &mut S,
    index: &mut usize,
    name: &str,
) -> Result<(), Stream> {
    let doc = std::mem::take(doc);
    if !doc.has_items {
        if doc.marked || !blank_text(&doc.head) {
            // One document (or none, if only comments): numbered as the
            // whole-file parser numbers it.
            let before = *index;
            let mut objects = FileObjects::default();
            parse_documents(&doc.head, name, index, &mut objects)?;
            out.append_objects(objects);
            if *index == before {
                *index += 1;
            }
        }
        return Ok(());
    }
    *index += 1;
    let head: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&doc.head).map_err(|_| Stream::ReadWhole)?;
    let field = |k: &str| head.get(k).and_then(|v| v.as_str());
    if (field("apiVersion"), field("kind")) == (Some("v1"), Some("List")) {
        if let Some(e) = doc.failed {
            return Err(Stream::Failed(e));
        }
        out.append(doc.items);
        return Ok(());
    }
    // Items of anything but a List (a DeploymentList) are not ours; the
    // document is what its other fields make of it.
    let head = if head.is_null() {
        serde_yaml_ng::Value::Mapping(Default::default())
    } else {
        head
    };
    add_document(out, head, name, *index)?;
    Ok(())
}
