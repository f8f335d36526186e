//! Turns the portal's message catalogues (`i18n/*.toml`, one per language)
//! into one `Texts` struct and a static per language. A key missing from
//! one catalogue, or one a page asks for that no catalogue has, fails the
//! build.

use std::{collections::BTreeMap, fmt::Write, path::Path};

const LANGUAGES: [(&str, &str); 2] = [("id", "ID"), ("en", "EN")];

fn load(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let table: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    table
        .into_iter()
        .map(|(k, v)| {
            let ok = k.starts_with(|c: char| c.is_ascii_lowercase())
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            assert!(ok, "{}: key {k:?} is not lower_snake_case", path.display());
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("{}: {k} is not a string", path.display()))
                .to_owned();
            (k, v)
        })
        .collect()
}

fn main() {
    let dir = Path::new("i18n");
    println!("cargo:rerun-if-changed=i18n");
    let catalogues: Vec<_> = LANGUAGES
        .iter()
        .map(|(file, name)| {
            let path = dir.join(format!("{file}.toml"));
            println!("cargo:rerun-if-changed={}", path.display());
            (*name, file, load(&path))
        })
        .collect();
    let keys: Vec<&String> = catalogues[0].2.keys().collect();
    for (_, file, c) in &catalogues[1..] {
        for k in &keys {
            assert!(c.contains_key(*k), "i18n/{file}.toml lacks {k}");
        }
        for k in c.keys() {
            assert!(
                catalogues[0].2.contains_key(k),
                "i18n/{}.toml lacks {k}",
                catalogues[0].1
            );
        }
    }
    let mut out = String::from(
        "/// Every string the portal shows, in one language.\n\
         #[derive(Debug)]\npub struct Texts {\n",
    );
    for k in &keys {
        writeln!(out, "    pub {k}: &'static str,").unwrap();
    }
    out.push_str("}\n");
    for (name, _, c) in &catalogues {
        writeln!(out, "pub static {name}: Texts = Texts {{").unwrap();
        for (k, v) in c {
            writeln!(out, "    {k}: {v:?},").unwrap();
        }
        out.push_str("};\n");
    }
    let target = Path::new(&std::env::var("OUT_DIR").unwrap()).join("texts.rs");
    std::fs::write(target, out).unwrap();
}
