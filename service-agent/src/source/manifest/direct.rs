//! Typing a List item straight from the YAML parser's events, without the
//! `serde_yaml_ng::Value` tree in between: building, typing and dropping
//! that tree was about a fifth of the CPU that parsing a 10,000-Service
//! `kubectl get -o yaml` file costs (the YAML scanner is most of the rest).
//!
//! The result must be the one the Value path gives, so [`ValueLike`]
//! makes a YAML deserializer answer as a Value would:
//! - every scalar is resolved by what it looks like, never by what the
//!   target type asks for (`name: 0x1F` is a number, and a number is not a
//!   name), because a Value is built without knowing the target;
//! - a mapping with a key twice is an error, as inserting it into a Value
//!   mapping is, also inside fields nobody reads;
//! - keys are read as Values, and given to the target type as such.
//!
//! Anything else this path refuses (a tag, an item it cannot tell the
//! kind of, any error at all) sends the item down the Value path, which
//! gives the object or the error with its field path. So an item this
//! path types is typed as the Value path would type it, and an item it
//! does not is no worse off than before.
use std::{fmt, marker::PhantomData};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
    Visitor,
};
use serde_yaml_ng::Value;

use super::parse::{Kind, Sink, Typer};

/// A deserializer that answers as a `serde_yaml_ng::Value` of the same
/// text would (see the module documentation).
pub(super) struct ValueLike<D>(pub D);

/// The error this path gives up with when the Value path may differ.
fn unlike<E: de::Error>(what: &str) -> E {
    E::custom(format_args!("{what}: left to the Value path"))
}

macro_rules! as_any {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.0.deserialize_any(Like(visitor))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ValueLike<D> {
    type Error = D::Error;

    as_any!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        // Skipped fields are still walked: a Value holds them, and a key
        // twice in one of them is the Value path's error too.
        deserialize_ignored_any,
    );

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_option(Like(visitor))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Like(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        // As a Value does: the newtype's content is this very node.
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Like(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Like(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(Like(visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, D::Error> {
        Err(unlike("an enum"))
    }
}

/// A visitor handing on what it is given, with the nested deserializers
/// and accesses wrapped so that they answer as Values too.
struct Like<V>(V);

macro_rules! pass {
    ($($method:ident($t:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $t) -> Result<Self::Value, E> {
                self.0.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Like<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }

    pass!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(ValueLike(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(ValueLike(d))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(LikeSeq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(LikeMap {
            map,
            keys: Vec::new(),
        })
    }

    /// serde_yaml_ng hands a tagged node (`!foo x`) over as an enum.
    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(unlike("a tagged node"))
    }
}

/// A seed whose deserializer answers as a Value would.
struct LikeSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for LikeSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(ValueLike(d))
    }
}

struct LikeSeq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for LikeSeq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(LikeSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// A mapping's entries, its keys read as Values and checked for repeats.
struct LikeMap<A> {
    map: A,
    keys: Vec<Value>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for LikeMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.map.next_key_seed(LikeSeed(PhantomData::<Value>))? else {
            return Ok(None);
        };
        // Mappings here are small (an object's fields, a label set): a
        // scan costs less than hashing every key.
        if self.keys.contains(&key) {
            return Err(unlike("a key twice in one mapping"));
        }
        // A string key reaches the seed as a Value's string would (it
        // visits `str`), without copying the Value.
        let typed = match &key {
            Value::String(s) => seed.deserialize(de::value::StrDeserializer::<A::Error>::new(s))?,
            other => seed.deserialize(other.clone()).map_err(de::Error::custom)?,
        };
        self.keys.push(key);
        Ok(Some(typed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(LikeSeed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// Types one List item (`text` is `- ` and the item, as the splitter
/// cuts it) into `out` if this path can; false leaves it to the Value path.
pub(super) fn type_item<S: Sink>(text: &str, out: &mut S, origin: impl FnOnce() -> String) -> bool {
    let Some(kind) = kind_hint(text).and_then(|(api_version, kind)| Kind::of(api_version, kind))
    else {
        return false;
    };
    kind.put(Straight(text), out, origin()).is_ok()
}

/// An item's text, typed by [`one`].
struct Straight<'a>(&'a str);

impl Typer for Straight<'_> {
    /// Nothing to say: the Value path gives the error.
    type Error = ();

    fn typed<K: DeserializeOwned>(self) -> Result<K, ()> {
        one(self.0).ok_or(())
    }
}

/// The item's `apiVersion` and `kind` as its top-level lines spell them,
/// when they are plain words: only a guess of which type to try, which
/// [`one`] then holds the item to.
fn kind_hint(text: &str) -> Option<(&str, &str)> {
    let (mut api_version, mut kind) = (None, None);
    for (i, line) in text.lines().enumerate() {
        let top = if i == 0 {
            line.strip_prefix("- ")
        } else {
            line.strip_prefix("  ")
                .filter(|l| !l.starts_with([' ', '\t']))
        };
        let Some(top) = top else { continue };
        for (key, slot) in [("apiVersion:", &mut api_version), ("kind:", &mut kind)] {
            if let Some(v) = top.strip_prefix(key) {
                let v = v.trim();
                let word = !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"./-".contains(&b));
                if !word || slot.replace(v).is_some() {
                    return None;
                }
            }
        }
    }
    Some((api_version?, kind?))
}

/// The one item of `text` typed as `K`, if it is a mapping with
/// `apiVersion` and `kind` keys (whose values `K` checks) and nothing in it
/// needs the Value path.
fn one<K: DeserializeOwned>(text: &str) -> Option<K> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    de.deserialize_seq(OneItem(PhantomData)).ok().flatten()
}

struct OneItem<K>(PhantomData<K>);

impl<'de, K: DeserializeOwned> Visitor<'de> for OneItem<K> {
    type Value = Option<K>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence of one object")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<K>, A::Error> {
        let Some(item) = seq.next_element_seed(Item(PhantomData))? else {
            return Ok(None);
        };
        // A second item is the splitter's mistake: the Value path says so.
        let more = seq.next_element::<de::IgnoredAny>()?.is_some();
        Ok(item.filter(|_| !more))
    }
}

struct Item<K>(PhantomData<K>);

impl<'de, K: DeserializeOwned> DeserializeSeed<'de> for Item<K> {
    type Value = Option<K>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<K>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, K: DeserializeOwned> Visitor<'de> for Item<K> {
    type Value = Option<K>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    /// The object's own mapping: its keys are seen here, so that an item
    /// without `apiVersion` or `kind` (which `K` would accept) is left to
    /// the Value path, which refuses it.
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<K>, A::Error> {
        let mut map = LikeMap {
            map,
            keys: Vec::new(),
        };
        let object = K::deserialize(de::value::MapAccessDeserializer::new(&mut map))?;
        let has = |k: &str| map.keys.iter().any(|key| key.as_str() == Some(k));
        Ok((has("apiVersion") && has("kind")).then_some(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest::{FileObjects, parse::add_document};

    /// The item through this path (None: left to the Value path) and
    /// through the Value path.
    fn both(text: &str) -> (Option<FileObjects>, Result<FileObjects, String>) {
        let mut direct = FileObjects::default();
        let handled = type_item(text, &mut direct, || "f#1".to_string());
        let value = serde_yaml_ng::from_str::<Vec<Value>>(text)
            .map_err(|e| e.to_string())
            .and_then(|mut items| {
                let mut out = FileObjects::default();
                let item = items.pop().ok_or("no item")?;
                add_document(&mut out, item, "f", 1).map_err(|e| e.to_string())?;
                Ok(out)
            });
        (handled.then_some(direct), value)
    }

    fn same(a: &FileObjects, b: &FileObjects) -> bool {
        a.services == b.services
            && a.endpoint_slices == b.endpoint_slices
            && a.endpoints == b.endpoints
            && a.pods == b.pods
    }

    /// Typed here, and exactly as the Value path types it.
    fn typed_alike(text: &str) {
        let (direct, value) = both(text);
        let direct = direct.unwrap_or_else(|| panic!("left to the Value path:\n{text}"));
        let value = value.unwrap_or_else(|e| panic!("the Value path refused it ({e}):\n{text}"));
        assert!(same(&direct, &value), "{direct:?}\n!=\n{value:?}");
        let count = direct.services.len()
            + direct.endpoint_slices.len()
            + direct.endpoints.len()
            + direct.pods.len();
        assert_eq!(count, 1, "{text}");
    }

    /// Left to the Value path (which may accept it or not).
    fn left(text: &str) {
        assert!(both(text).0.is_none(), "typed here:\n{text}");
    }

    const SERVICE: &str = r#"- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"name":"web"}}
      service.kubernetes.io/topology-mode: Auto
    creationTimestamp: "2026-01-02T03:04:05Z"
    labels:
      app: web
    name: web
    namespace: shop
    resourceVersion: "4711"
    uid: 8c1b0b52-3f1e-4c8e-9f5e-2d7c1c2a9b10
  spec:
    clusterIP: 10.96.0.10
    clusterIPs:
    - 10.96.0.10
    externalTrafficPolicy: Local
    ipFamilies: [IPv4]
    ports:
    - name: http
      nodePort: 30080
      port: 80
      protocol: TCP
      targetPort: 8080
    - name: metrics
      port: 9090
      targetPort: metrics
    selector:
      app: web
    sessionAffinity: ClientIP
    sessionAffinityConfig:
      clientIP:
        timeoutSeconds: 600
    type: NodePort
  status:
    loadBalancer: {}
"#;

    const SLICE: &str = r#"- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.0.1.5
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-1
    targetRef:
      kind: Pod
      name: web-1
      namespace: shop
    zone: zone-a
  - addresses: ["10.0.1.6"]
    conditions: {ready: false}
    hints:
      forZones:
      - name: zone-a
  kind: EndpointSlice
  metadata:
    labels:
      kubernetes.io/service-name: web
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    name: web-abcde
    namespace: shop
    ownerReferences:
    - apiVersion: v1
      kind: Service
      name: web
      uid: 8c1b0b52-3f1e-4c8e-9f5e-2d7c1c2a9b10
  ports:
  - name: http
    port: 8080
    protocol: TCP
"#;

    #[test]
    fn kubectl_items_are_typed_here_as_the_value_path_types_them() {
        typed_alike(SERVICE);
        typed_alike(SLICE);
        typed_alike(
            "- apiVersion: v1\n  kind: Endpoints\n  metadata:\n    name: legacy\n  subsets:\n  - addresses:\n    - ip: 10.0.2.1\n    ports:\n    - port: 80\n",
        );
        typed_alike(
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: p\n    labels: {app: web}\n  spec:\n    containers:\n    - name: c\n      image: nginx\n      ports:\n      - containerPort: 8080\n        name: http\n  status:\n    podIP: 10.0.1.5\n    phase: Running\n",
        );
        // Aliases are the parser's business, the same on both paths.
        typed_alike(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: a\n    labels: &l {app: a}\n    annotations: *l\n",
        );
    }

    #[test]
    fn what_a_value_would_type_differently_is_left_to_the_value_path() {
        let with = |from: &str, to: &str| {
            assert!(SERVICE.contains(from), "{from}");
            SERVICE.replacen(from, to, 1)
        };
        // A key twice: at the top, in a field read, in one nobody reads.
        left(&with(
            "  kind: Service\n",
            "  kind: Service\n  kind: Service\n",
        ));
        left(&with("    name: web\n", "    name: web\n    name: other\n"));
        left(&with(
            "    uid: 8c1b",
            "    managedFields:\n    - {a: 1, a: 2}\n    uid: 8c1b",
        ));
        // A name that YAML reads as a number, a port that it reads as text.
        left(&with("    name: web\n", "    name: 0x1F\n"));
        left(&with("      port: 80\n", "      port: \"80\"\n"));
        // Tags, and no kind or apiVersion key behind what the lines say.
        left(&with("    name: web\n", "    name: !custom web\n"));
        left(&with("  kind: Service\n", "  kind: \"Service\"\n"));
        left(&with("- apiVersion: v1\n", "- apiVersion: v2\n"));
        left("- kind: Service\n  metadata: {name: a}\n");
        // Two items where one was cut.
        left(&format!("{SERVICE}- apiVersion: v1\n  kind: Service\n"));
        // And the Value path refuses these outright.
        for text in [
            with("  kind: Service\n", "  kind: Service\n  kind: Service\n"),
            with("    name: web\n", "    name: 0x1F\n"),
            with("      port: 80\n", "      port: \"80\"\n"),
        ] {
            assert!(both(&text).1.is_err(), "{text}");
        }
    }

    #[test]
    fn a_kind_the_dataplane_does_not_read_is_left_alone() {
        left("- apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n");
    }
}
